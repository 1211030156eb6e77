//go:build tools

// Package tools pins the etcd server that the dev cluster builds.
package tools

import _ "go.etcd.io/etcd/server/v3"
