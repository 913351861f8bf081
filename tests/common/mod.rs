//! Helpers shared by the cross-crate tests: spawning nodes, network namespaces.
