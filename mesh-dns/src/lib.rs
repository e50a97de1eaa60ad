//! mesh-dns: the resolver every task uses for service names.
