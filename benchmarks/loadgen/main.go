// edgefleet-loadgen: a closed-loop HTTP/1.1 (and gRPC) load generator for benchmarks/runtime.py.
//
// Each of -c connections sends the same pre-built request (a file holding the whole request: head and
// body, so JSON and the binary tensor extension alike) on one keep-alive socket, waits for the answer,
// and sends it again. Latency is kept per request in nanoseconds (hey prints seconds with 4 decimals,
// too coarse for a 0.1 ms goal). Protocol on stdout: "start" when the warmup ends, "end" when the
// measured window closes, then one JSON line with the result.
//
// With -grpc METHOD the file holds a serialized protobuf message instead, sent as a unary gRPC call to
// /METHOD over cleartext HTTP/2 (grpcConn below): one HTTP/2 connection per -c, as grpcio clients hold one
// channel each. Status 200 means the call returned a message; FirstBody is that message.
package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"runtime"
	"sort"
	"strconv"
	"sync"
	"syscall"
	"time"
)

type result struct {
	Requests      int     `json:"requests"`
	Errors        int     `json:"errors"`
	ElapsedS      float64 `json:"elapsed_s"`
	P50Ms         float64 `json:"p50_ms"`
	P95Ms         float64 `json:"p95_ms"`
	ThroughputRPS float64 `json:"throughput_rps"`
	FirstStatus   int     `json:"first_status"`
	FirstBody     []byte  `json:"first_body"`
	FirstError    string  `json:"first_error,omitempty"`
	ClientCPUS    float64 `json:"client_cpu_s"`
}

// cpuSeconds is this process's user + system CPU time so far.
func cpuSeconds() float64 {
	var ru syscall.Rusage
	if syscall.Getrusage(syscall.RUSAGE_SELF, &ru) != nil {
		return 0
	}
	return float64(ru.Utime.Nano()+ru.Stime.Nano()) / 1e9
}

// blockingSocket is a TCP socket in blocking mode, used by one locked OS thread: a request costs a write
// and a read system call, without the Go netpoller's extra wake-ups (less client CPU per request).
type blockingSocket int

func (s blockingSocket) Read(p []byte) (int, error) {
	for {
		n, err := syscall.Read(int(s), p)
		if err == syscall.EINTR {
			continue
		}
		if err != nil {
			return 0, err
		}
		if n == 0 {
			return 0, io.EOF
		}
		return n, nil
	}
}

func (s blockingSocket) Write(p []byte) (int, error) {
	done := 0
	for done < len(p) {
		n, err := syscall.Write(int(s), p[done:])
		if err == syscall.EINTR {
			continue
		}
		if err != nil {
			return done, err
		}
		done += n
	}
	return done, nil
}

func (s blockingSocket) Close() error { return syscall.Close(int(s)) }

type conn struct {
	c   io.ReadWriteCloser
	r   *bufio.Reader
	buf []byte
}

func dial(addr string) (*conn, error) {
	tcp, err := net.ResolveTCPAddr("tcp4", addr)
	if err != nil {
		return nil, err
	}
	fd, err := syscall.Socket(syscall.AF_INET, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, err
	}
	sa := &syscall.SockaddrInet4{Port: tcp.Port}
	copy(sa.Addr[:], tcp.IP.To4())
	if err = syscall.Connect(fd, sa); err == nil {
		err = syscall.SetsockoptInt(fd, syscall.IPPROTO_TCP, syscall.TCP_NODELAY, 1)
	}
	if err != nil {
		syscall.Close(fd)
		return nil, err
	}
	s := blockingSocket(fd)
	return &conn{c: s, r: bufio.NewReaderSize(s, 65536)}, nil
}

var contentLength = []byte("content-length:")

// roundtrip sends req and reads one response with a Content-Length body; it returns the status and body.
func (k *conn) roundtrip(req []byte) (int, []byte, error) {
	if _, err := k.c.Write(req); err != nil {
		return 0, nil, err
	}
	line, err := k.r.ReadSlice('\n')
	if err != nil {
		return 0, nil, err
	}
	if len(line) < 12 || !bytes.HasPrefix(line, []byte("HTTP/1.")) {
		return 0, nil, fmt.Errorf("bad status line %q", line)
	}
	status, err := strconv.Atoi(string(line[9:12]))
	if err != nil {
		return 0, nil, fmt.Errorf("bad status line %q", line)
	}
	length := -1
	for {
		line, err = k.r.ReadSlice('\n')
		if err != nil {
			return 0, nil, err
		}
		if len(line) <= 2 {
			break
		}
		if len(line) > len(contentLength) && bytes.EqualFold(line[:len(contentLength)], contentLength) {
			length, err = strconv.Atoi(string(bytes.TrimSpace(line[len(contentLength):])))
			if err != nil {
				return 0, nil, fmt.Errorf("bad Content-Length %q", line)
			}
		}
	}
	if length < 0 {
		return 0, nil, errors.New("response without Content-Length (chunked answers are not supported)")
	}
	if cap(k.buf) < length {
		k.buf = make([]byte, length)
	}
	body := k.buf[:length]
	_, err = io.ReadFull(k.r, body)
	return status, body, err
}

// caller sends one request and returns (status, body): an HTTP/1.1 connection or a gRPC channel.
type caller interface {
	roundtrip(req []byte) (int, []byte, error)
	close()
}

func (k *conn) close() { k.c.Close() }

// grpcConn is one cleartext HTTP/2 connection on a blocking socket that makes unary gRPC calls of one method,
// one at a time: the same client cost model as the HTTP/1.1 rows (a write and a read per call), where net/http's
// HTTP/2 client costs several times the CPU. Enough HTTP/2 for that and no more: the request's header block is
// built once (literals without indexing, so no HPACK state), answers' headers are not decoded (a call succeeded
// when a DATA frame carried its message before the stream ended: our server never sends a message with an
// error), SETTINGS and PING are acknowledged, and the connection's receive window is topped up as it is used.
type grpcConn struct {
	s      blockingSocket
	r      *bufio.Reader
	block  []byte // the request's HPACK header block
	stream uint32
	out    []byte
	body   []byte
}

const (
	frameData         = 0x0
	frameHeaders      = 0x1
	frameRstStream    = 0x3
	frameSettings     = 0x4
	framePing         = 0x6
	frameGoAway       = 0x7
	frameWindowUpdate = 0x8
	flagEndStream     = 0x1
	flagAck           = 0x1
	flagEndHeaders    = 0x4
)

func hpackString(b []byte, s string) []byte {
	if len(s) >= 127 {
		panic("header longer than this client encodes")
	}
	return append(append(b, byte(len(s))), s...)
}

// requestBlock: :method POST (static 3), :scheme http (static 6), then literals without indexing.
func requestBlock(authority, path string) []byte {
	b := []byte{0x80 | 3, 0x80 | 6}
	b = hpackString(append(b, 0x04), path)                     // :path, name from static 4
	b = hpackString(append(b, 0x01), authority)                // :authority, name from static 1
	b = hpackString(append(b, 0x0f, 0x10), "application/grpc") // content-type, static 31 (4-bit prefix 15 + 16)
	b = hpackString(hpackString(append(b, 0x00), "te"), "trailers")
	return b
}

func frame(b []byte, typ, flags byte, stream uint32, payload []byte) []byte {
	n := len(payload)
	b = append(b, byte(n>>16), byte(n>>8), byte(n), typ, flags,
		byte(stream>>24), byte(stream>>16), byte(stream>>8), byte(stream))
	return append(b, payload...)
}

func dialGRPC(addr, method string) (*grpcConn, error) {
	k, err := dial(addr)
	if err != nil {
		return nil, err
	}
	g := &grpcConn{s: k.c.(blockingSocket), r: k.r, block: requestBlock(addr, "/"+method), stream: 1}
	hello := append([]byte("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"), 0, 0, 0, frameSettings, 0, 0, 0, 0, 0)
	if _, err = g.s.Write(hello); err != nil {
		g.s.Close()
		return nil, err
	}
	return g, nil
}

func (g *grpcConn) close() { g.s.Close() }

// roundtrip sends msg as one length-prefixed gRPC message on a new stream and reads that stream to its end.
func (g *grpcConn) roundtrip(msg []byte) (int, []byte, error) {
	id := g.stream
	g.stream += 2
	n := len(msg)
	data := append([]byte{0, byte(n >> 24), byte(n >> 16), byte(n >> 8), byte(n)}, msg...)
	if len(data) > 16384 {
		return 0, nil, errors.New("message larger than one DATA frame (16384 bytes): not supported by this client")
	}
	g.out = frame(frame(g.out[:0], frameHeaders, flagEndHeaders, id, g.block), frameData, flagEndStream, id, data)
	if _, err := g.s.Write(g.out); err != nil {
		return 0, nil, err
	}
	g.body = g.body[:0]
	var head [9]byte
	for {
		if _, err := io.ReadFull(g.r, head[:]); err != nil {
			return 0, nil, err
		}
		length := int(head[0])<<16 | int(head[1])<<8 | int(head[2])
		typ, flags := head[3], head[4]
		stream := (uint32(head[5])<<24 | uint32(head[6])<<16 | uint32(head[7])<<8 | uint32(head[8])) & 0x7fffffff
		payload := make([]byte, length)
		if _, err := io.ReadFull(g.r, payload); err != nil {
			return 0, nil, err
		}
		var reply []byte
		switch {
		case typ == frameSettings && flags&flagAck == 0:
			reply = frame(nil, frameSettings, flagAck, 0, nil)
		case typ == framePing && flags&flagAck == 0:
			reply = frame(nil, framePing, flagAck, 0, payload)
		case typ == frameGoAway:
			return 0, nil, errors.New("server sent GOAWAY")
		case stream != id:
		case typ == frameRstStream:
			return 0, nil, errors.New("server reset the stream")
		case typ == frameData:
			g.body = append(g.body, payload...)
			if length > 0 { // give the connection's window back (the stream ends soon)
				w := []byte{byte(length >> 24), byte(length >> 16), byte(length >> 8), byte(length)}
				reply = frame(nil, frameWindowUpdate, 0, 0, w)
			}
		}
		if reply != nil {
			if _, err := g.s.Write(reply); err != nil {
				return 0, nil, err
			}
		}
		if stream == id && flags&flagEndStream != 0 && (typ == frameData || typ == frameHeaders) {
			if len(g.body) < 5 {
				return 500, nil, nil // trailers only: an error status
			}
			return 200, g.body[5:], nil
		}
	}
}

func percentile(sorted []int64, q float64) float64 {
	if len(sorted) == 0 {
		return 0
	}
	return float64(sorted[int(q*float64(len(sorted)-1))]) / 1e6
}

func main() {
	addr := flag.String("addr", "127.0.0.1:8080", "host:port of the server")
	reqFile := flag.String("request", "", "file with the whole HTTP/1.1 request (head and body)")
	concurrency := flag.Int("c", 1, "connections, each with one request in flight")
	seconds := flag.Float64("seconds", 4, "measured seconds")
	warmup := flag.Float64("warmup", 0.5, "seconds of requests before measuring")
	grpcMethod := flag.String("grpc", "", "send -request as a unary gRPC call of this method (package.Service/Method)")
	flag.Parse()
	connect := func() (caller, error) {
		if *grpcMethod != "" {
			g, err := dialGRPC(*addr, *grpcMethod)
			if err != nil {
				return nil, err
			}
			return g, nil
		}
		k, err := dial(*addr)
		if err != nil {
			return nil, err // a nil caller, not a nil *conn inside one
		}
		return k, nil
	}
	if os.Getenv("GOMAXPROCS") == "" {
		runtime.GOMAXPROCS(*concurrency + 1) // a P for each connection's thread when its call returns
	}
	req, err := os.ReadFile(*reqFile)
	if err != nil {
		fmt.Fprintln(os.Stderr, "edgefleet-loadgen: -request:", err)
		os.Exit(2)
	}
	out := result{}
	first, err := connect()
	if err == nil {
		var body []byte
		out.FirstStatus, body, err = first.roundtrip(req)
		out.FirstBody = append([]byte(nil), body...)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "edgefleet-loadgen: first request:", err)
		os.Exit(1)
	}
	first.close()

	lats := make([][]int64, *concurrency)
	errs := make([]int, *concurrency)
	firstErr := make([]error, *concurrency)
	var ready, done sync.WaitGroup
	startMeasuring := make(chan struct{})
	var end time.Time
	warmEnd := time.Now().Add(time.Duration(*warmup * float64(time.Second)))
	for i := 0; i < *concurrency; i++ {
		ready.Add(1)
		done.Add(1)
		go func(i int) {
			defer done.Done()
			runtime.LockOSThread() // its own thread: blocking calls never hold up the other connections
			k, err := connect()
			for err == nil && time.Now().Before(warmEnd) {
				_, _, err = k.roundtrip(req)
			}
			ready.Done()
			<-startMeasuring
			lat := make([]int64, 0, 1<<16)
			for {
				t0 := time.Now()
				if !t0.Before(end) {
					break
				}
				if err != nil { // count it, note the first, and go on with a new connection
					errs[i]++
					if firstErr[i] == nil {
						firstErr[i] = err
					}
					if k != nil {
						k.close()
					}
					k, err = connect()
					continue
				}
				var status int
				status, _, err = k.roundtrip(req)
				if err == nil && status != 200 {
					err = fmt.Errorf("HTTP %d", status)
				}
				if err == nil {
					lat = append(lat, int64(time.Since(t0)))
				}
			}
			lats[i] = lat
			if k != nil {
				k.close()
			}
		}(i)
	}
	ready.Wait()
	fmt.Println("start")
	cpu0 := cpuSeconds()
	t0 := time.Now()
	end = t0.Add(time.Duration(*seconds * float64(time.Second)))
	close(startMeasuring)
	done.Wait()
	elapsed := time.Since(t0).Seconds()
	out.ClientCPUS = cpuSeconds() - cpu0
	fmt.Println("end")
	var all []int64
	for i, l := range lats {
		all = append(all, l...)
		out.Errors += errs[i]
		if firstErr[i] != nil && out.FirstError == "" {
			out.FirstError = firstErr[i].Error()
		}
	}
	sort.Slice(all, func(a, b int) bool { return all[a] < all[b] })
	out.Requests = len(all)
	out.ElapsedS = elapsed
	out.ThroughputRPS = float64(len(all)) / elapsed
	out.P50Ms = percentile(all, 0.5)
	out.P95Ms = percentile(all, 0.95)
	json.NewEncoder(os.Stdout).Encode(out)
}
