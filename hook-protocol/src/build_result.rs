//! TODO(build_result): being written.
