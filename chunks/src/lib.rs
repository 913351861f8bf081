//! Guest images as content-addressed chunks.
