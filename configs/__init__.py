"""The shipped training configs, installed as the package data ``imagebind_lite.configs``.

This folder is the top-level ``configs/`` of the source tree; ``setup.py`` maps it into the
package, so scripts find a config the same way from a checkout and from an installed wheel.
"""
