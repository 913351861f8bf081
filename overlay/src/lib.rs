//! The buyer-owned layer-2 overlay.
