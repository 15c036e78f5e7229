//! Ferry's migration wire protocol: versioned, little-endian, length-checked
