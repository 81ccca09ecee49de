//! TODO(log): being written.
