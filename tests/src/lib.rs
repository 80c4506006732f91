//! Test support: start and stop real brokers.
