//! The live migration engine: sender and receiver state machines over traits
