//! Local control plane and brokers for tests and the quick start (being written).
