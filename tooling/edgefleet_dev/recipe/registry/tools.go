//go:build tools

// Package tools pins the CNCF distribution registry that the dev cluster builds.
package tools

import _ "github.com/distribution/distribution/v3/cmd/registry"
