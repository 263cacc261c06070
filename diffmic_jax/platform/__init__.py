"""The ground floor: what every wing may use and none of it knows about the model.

errors (the user-fixable error), files (atomic writes), trees (flat pytrees), host (CPU and
allocator settings), sharding (the data mesh), distributed (processes), profiling (traces).
"""
