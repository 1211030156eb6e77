// edgefleet-loadgen: a closed-loop HTTP/1.1 load generator for benchmarks/runtime.py.
//
// Each of -c connections sends the same pre-built request (a file holding the whole request: head and
// body, so JSON and the binary tensor extension alike) on one keep-alive socket, waits for the answer,
// and sends it again. Latency is kept per request in nanoseconds (hey prints seconds with 4 decimals,
// too coarse for a 0.1 ms goal). Protocol on stdout: "start" when the warmup ends, "end" when the
// measured window closes, then one JSON line with the result.
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
	flag.Parse()
	if os.Getenv("GOMAXPROCS") == "" {
		runtime.GOMAXPROCS(*concurrency + 1) // a P for each connection's thread when its call returns
	}
	req, err := os.ReadFile(*reqFile)
	if err != nil {
		fmt.Fprintln(os.Stderr, "edgefleet-loadgen: -request:", err)
		os.Exit(2)
	}
	out := result{}
	first, err := dial(*addr)
	if err == nil {
		var body []byte
		out.FirstStatus, body, err = first.roundtrip(req)
		out.FirstBody = append([]byte(nil), body...)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "edgefleet-loadgen: first request:", err)
		os.Exit(1)
	}
	first.c.Close()

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
			k, err := dial(*addr)
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
						k.c.Close()
					}
					k, err = dial(*addr)
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
				k.c.Close()
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
