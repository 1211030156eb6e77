//go:build tools

// Package tools pins crane (go-containerregistry), which builds, inspects and pushes edgefleet's images.
package tools

import _ "github.com/google/go-containerregistry/cmd/crane"
