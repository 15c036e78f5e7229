//! Guest memory, dirty tracking and memory preparation
