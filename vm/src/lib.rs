//! Running guests.
