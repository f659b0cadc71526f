"""Contacts as data (issue 20): the rules their values follow. Policy only, no I/O;
the database side is ``store.contacts``."""
