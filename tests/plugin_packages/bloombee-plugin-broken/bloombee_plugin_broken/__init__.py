"""Importing this plugin fails, as a plugin with a missing dependency would."""

raise ImportError("bloombee_plugin_broken needs the package 'not-installed-anywhere'")
