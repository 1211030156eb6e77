"""Container images edgefleet builds itself, without a Docker engine.

Debian packages are unpacked into a minimal root filesystem, wheels pinned by hash are installed beside
the project's own packages, each part becomes a reproducible tar layer, and crane (go-containerregistry)
assembles, labels and pushes the images through a registry on loopback that also serves as the cache.
"""
