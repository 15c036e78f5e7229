//! Migration transports: URIs, listeners and channel connections over TCP and unix sockets
