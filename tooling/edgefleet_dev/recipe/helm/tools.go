//go:build tools

// Package tools pins the helm command that the dev cluster builds.
package tools

import _ "helm.sh/helm/v3/cmd/helm"
