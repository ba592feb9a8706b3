"""Built-in green-mlops plugins. Each module is one plugin, registered through the
``green_mlops`` entry-point group exactly like a third-party plugin."""
