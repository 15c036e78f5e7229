//! Ferry's test VMM: multiboot guests on KVM, state save/restore, snapshots, control API
