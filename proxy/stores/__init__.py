"""Where Keybearer keeps state: one interface, an implementation per backend."""

from proxy.stores.base import Connection, Store, StoreUnavailable, TokenStore, open_store, open_token_store

__all__ = ["Connection", "Store", "StoreUnavailable", "TokenStore", "open_store", "open_token_store"]
