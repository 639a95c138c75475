"""Where Keybearer keeps state: one interface, an implementation per backend."""

from proxy.stores.base import Store, StoreUnavailable, open_store

__all__ = ["Store", "StoreUnavailable", "open_store"]
