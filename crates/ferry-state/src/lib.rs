//! Versioned, serializable KVM VM and vCPU state, and the snapshot file format
