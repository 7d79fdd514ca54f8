"""ml_collections configs: one `default_*_configs.py` per dataset, variants under ve/ vp/ subvp/.

Each variant module defines `get_config()`, starts from its dataset default and overrides only
what differs. Every key a variant sets exists in its default, so configs can be locked.
"""
