//go:build tools

// Package tools pins the kwok controller that the dev cluster builds.
package tools

import _ "sigs.k8s.io/kwok/cmd/kwok"
