//! Simulated Koupleless bases (being written).
