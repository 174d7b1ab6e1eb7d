"""Bundled demo models, data and the activation study: apart from the library, which never imports them."""
