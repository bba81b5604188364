// cva-ttrpc-client: a test peer built on containerd's own ttrpc client package.
//
// It reads one JSON job from stdin:
//
//	{"socket": "/path/to.sock", "deadline_ms": 10000,
//	 "calls": [{"service": "api.SecureMountService", "method": "SecureMount",
//	            "payload_hex": "0a0c...", "timeout_nano": 0, "metadata": {"k": "v"}}]}
//
// dials the unix socket once, performs every call concurrently on that one connection, and
// prints a JSON array with one result per call, in input order:
//
//	{"code": 0, "message": "", "payload_hex": "...", "transport_error": ""}
//
// code/message come from the ttrpc Response status (0 = OK); transport_error is set when the
// call failed without a status (connection closed, client-side deadline). timeout_nano > 0 is put
// into the Request as is (through an interceptor), independent of the client-side deadline.
package main

import (
	"context"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"sync"
	"time"

	"github.com/containerd/ttrpc"
	"google.golang.org/grpc/status"
)

// rawMessage passes payload bytes through the client's (gogo) protobuf codec untouched.
type rawMessage struct{ data []byte }

func (m *rawMessage) Reset()                   { m.data = nil }
func (m *rawMessage) String() string           { return hex.EncodeToString(m.data) }
func (m *rawMessage) ProtoMessage()            {}
func (m *rawMessage) Marshal() ([]byte, error) { return m.data, nil }
func (m *rawMessage) Unmarshal(b []byte) error {
	m.data = append([]byte(nil), b...)
	return nil
}

type call struct {
	Service     string            `json:"service"`
	Method      string            `json:"method"`
	PayloadHex  string            `json:"payload_hex"`
	TimeoutNano int64             `json:"timeout_nano"`
	Metadata    map[string]string `json:"metadata"`
}

type job struct {
	Socket     string `json:"socket"`
	DeadlineMs int64  `json:"deadline_ms"`
	Calls      []call `json:"calls"`
}

type result struct {
	Code           int32  `json:"code"`
	Message        string `json:"message"`
	PayloadHex     string `json:"payload_hex"`
	TransportError string `json:"transport_error"`
}

type timeoutKey struct{}

// setTimeout overrides Request.timeout_nano with the value the job asked for.
func setTimeout(ctx context.Context, req *ttrpc.Request, resp *ttrpc.Response,
	info *ttrpc.UnaryClientInfo, invoker ttrpc.Invoker) error {
	if t, ok := ctx.Value(timeoutKey{}).(int64); ok && t != 0 {
		req.TimeoutNano = t
	}
	return invoker(ctx, req, resp)
}

func fail(format string, args ...interface{}) {
	fmt.Fprintf(os.Stderr, "cva-ttrpc-client: "+format+"\n", args...)
	os.Exit(2)
}

func main() {
	var j job
	if err := json.NewDecoder(os.Stdin).Decode(&j); err != nil {
		fail("bad job on stdin: %v", err)
	}
	if j.DeadlineMs <= 0 {
		j.DeadlineMs = 30000
	}
	conn, err := net.Dial("unix", j.Socket)
	if err != nil {
		fail("dial %s: %v", j.Socket, err)
	}
	client := ttrpc.NewClient(conn, ttrpc.WithUnaryClientInterceptor(setTimeout))
	defer client.Close()

	results := make([]result, len(j.Calls))
	var wg sync.WaitGroup
	for i, c := range j.Calls {
		wg.Add(1)
		go func(i int, c call) {
			defer wg.Done()
			payload, err := hex.DecodeString(c.PayloadHex)
			if err != nil {
				results[i] = result{Code: -1, TransportError: "bad payload_hex"}
				return
			}
			ctx, cancel := context.WithTimeout(context.Background(),
				time.Duration(j.DeadlineMs)*time.Millisecond)
			defer cancel()
			ctx = context.WithValue(ctx, timeoutKey{}, c.TimeoutNano)
			if len(c.Metadata) > 0 {
				md := ttrpc.MD{}
				for k, v := range c.Metadata {
					md.Set(k, v)
				}
				ctx = ttrpc.WithMetadata(ctx, md)
			}
			var resp rawMessage
			err = client.Call(ctx, c.Service, c.Method, &rawMessage{data: payload}, &resp)
			r := result{PayloadHex: hex.EncodeToString(resp.data)}
			if err != nil {
				if st, ok := status.FromError(err); ok {
					r.Code = int32(st.Code())
					r.Message = st.Message()
				} else {
					r.Code = -1
					r.TransportError = err.Error()
				}
			}
			results[i] = r
		}(i, c)
	}
	wg.Wait()
	if err := json.NewEncoder(os.Stdout).Encode(results); err != nil {
		fail("write results: %v", err)
	}
}
