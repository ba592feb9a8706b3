"""Built-in green-mlops plugins. Each module is one plugin, registered by module
(``green_mlops.plugin_manager.DEFAULT_PLUGINS``) through the same hooks as a third-party plugin,
which registers through the ``green_mlops`` entry-point group."""
