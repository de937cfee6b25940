// Command porcupine checks a history exported by controlplane's
// controlplane.testing.linearizability.to_porcupine_json with Porcupine, the Go
// linearizability checker: an independent second opinion on the Python checker.
//
// Usage:
//
//	porcupine [-timeout 60s] [-visualize out.html] history.json
//
// The history ("-" reads standard input) is a JSON array of operations:
//
//	{"client_id": 3, "input": {"type": "put", "key": "k", "value": 1},
//	 "call": 1200, "output": null, "return": 1350}
//
// with inputs tagged put, get, cas or delete (a key-value map, checked per key)
// or read and write (a single register, initially absent). A pending operation
// ("return": null) may take effect at any time after its call, or never; an
// operation with "output_unknown": true returned, but its output is unknown.
// The model is the same as KVModel and RegisterModel in the Python module:
// get returns the value or null when absent; cas(key, expected, new) swaps when
// the current value equals expected (null: absent) and returns whether it did;
// the outputs of put, delete and write are ignored. Values compare as JSON
// values (numbers by value: 1 equals 1.0, but unlike Python, true is not 1).
//
// It prints a one-line verdict and exits 0 if the history is linearizable, 1 if
// it is not, 2 if the check timed out, and 3 on a usage or input error.
package main

import (
	"bytes"
	"encoding/json"
	"flag"
	"fmt"
	"hash/fnv"
	"io"
	"math"
	"math/big"
	"os"
	"sort"
	"time"

	"github.com/anishathalye/porcupine"
)

const (
	exitOK = iota
	exitIllegal
	exitUnknown
	exitError
)

// A value is the canonical text of a JSON value; "" is the absent value (null).
type value string

const absent value = ""

// unknownOutput is the output of an operation whose result was not observed.
type unknownOutput struct{}

type input struct {
	Kind     string
	Key      value
	Value    value
	Expected value
	New      value
}

type record struct {
	ClientID      int             `json:"client_id"`
	Input         json.RawMessage `json:"input"`
	Call          *int64          `json:"call"`
	Output        json.RawMessage `json:"output"`
	Return        *int64          `json:"return"`
	OutputUnknown bool            `json:"output_unknown"`
}

// canonical turns a JSON value into its canonical text: numbers by exact value,
// strings and booleans tagged, anything else (arrays, objects) compacted.
func canonical(raw json.RawMessage) (value, error) {
	raw = bytes.TrimSpace(raw)
	if len(raw) == 0 || string(raw) == "null" {
		return absent, nil
	}
	switch raw[0] {
	case '"':
		var s string
		if err := json.Unmarshal(raw, &s); err != nil {
			return absent, err
		}
		return value("s:" + s), nil
	case 't', 'f':
		var b bool
		if err := json.Unmarshal(raw, &b); err != nil {
			return absent, err
		}
		return value(fmt.Sprintf("b:%t", b)), nil
	case '[', '{':
		var out bytes.Buffer
		if err := json.Compact(&out, raw); err != nil {
			return absent, err
		}
		return value("j:" + out.String()), nil
	default:
		var n json.Number
		if err := json.Unmarshal(raw, &n); err != nil {
			return absent, err
		}
		r, ok := new(big.Rat).SetString(n.String())
		if !ok {
			return absent, fmt.Errorf("bad number %s", n)
		}
		return value("n:" + r.RatString()), nil
	}
}

func parseInput(raw json.RawMessage) (input, error) {
	var fields map[string]json.RawMessage
	if err := json.Unmarshal(raw, &fields); err != nil {
		return input{}, fmt.Errorf("input %s: %w", raw, err)
	}
	var kind string
	if err := json.Unmarshal(fields["type"], &kind); err != nil {
		return input{}, fmt.Errorf("input %s: no type tag", raw)
	}
	in := input{Kind: kind}
	var err error
	need := func(name string) value {
		v, ok := fields[name]
		if !ok && err == nil {
			err = fmt.Errorf("input %s: %s has no %q", raw, kind, name)
		}
		c, e := canonical(v)
		if e != nil && err == nil {
			err = fmt.Errorf("input %s: %s: %w", raw, name, e)
		}
		return c
	}
	switch kind {
	case "put":
		in.Key, in.Value = need("key"), need("value")
	case "get", "delete":
		in.Key = need("key")
	case "cas":
		in.Key, in.Expected, in.New = need("key"), need("expected"), need("new")
	case "write":
		in.Value = need("value")
	case "read":
	default:
		return input{}, fmt.Errorf("input %s: unknown type %q", raw, kind)
	}
	return in, err
}

func parseOutput(in input, raw json.RawMessage) (interface{}, error) {
	switch in.Kind {
	case "cas":
		var swapped bool
		if err := json.Unmarshal(raw, &swapped); err != nil {
			// Not a boolean: never what a cas returns, so the history is illegal.
			return value("invalid"), nil
		}
		return swapped, nil
	case "get", "read":
		return canonical(raw)
	default:
		return nil, nil // ignored
	}
}

func load(r io.Reader) ([]porcupine.Operation, error) {
	var records []record
	dec := json.NewDecoder(r)
	if err := dec.Decode(&records); err != nil {
		return nil, fmt.Errorf("not a JSON array of operations: %w", err)
	}
	ops := make([]porcupine.Operation, 0, len(records))
	for i, rec := range records {
		if rec.Call == nil {
			return nil, fmt.Errorf("operation %d has no call time", i)
		}
		in, err := parseInput(rec.Input)
		if err != nil {
			return nil, fmt.Errorf("operation %d: %w", i, err)
		}
		op := porcupine.Operation{ClientId: rec.ClientID, Input: in, Call: *rec.Call}
		switch {
		case rec.Return == nil:
			op.Return, op.Output = math.MaxInt64, unknownOutput{}
		case rec.OutputUnknown:
			op.Return, op.Output = *rec.Return, unknownOutput{}
		default:
			op.Return = *rec.Return
			if op.Output, err = parseOutput(in, rec.Output); err != nil {
				return nil, fmt.Errorf("operation %d: output: %w", i, err)
			}
		}
		if op.Return < op.Call {
			return nil, fmt.Errorf("operation %d returns before its call", i)
		}
		ops = append(ops, op)
	}
	return ops, nil
}

// step is KVModel.step on the value of one key (all operations of a partition
// share the key).
func step(state, in, out interface{}) (bool, interface{}) {
	current, op := state.(value), in.(input)
	_, unknown := out.(unknownOutput)
	switch op.Kind {
	case "get", "read":
		return unknown || out == current, current
	case "put", "write":
		return true, op.Value
	case "delete":
		return true, absent
	case "cas":
		swapped := current == op.Expected
		if !unknown && out != swapped {
			return false, current
		}
		if swapped {
			return true, op.New
		}
		return true, current
	}
	return false, current
}

func partition(history []porcupine.Operation) [][]porcupine.Operation {
	byKey := map[value][]porcupine.Operation{}
	var order []value
	for _, op := range history {
		key := op.Input.(input).Key
		if _, seen := byKey[key]; !seen {
			order = append(order, key)
		}
		byKey[key] = append(byKey[key], op)
	}
	parts := make([][]porcupine.Operation, 0, len(order))
	for _, key := range order {
		parts = append(parts, byKey[key])
	}
	return parts
}

func describe(v value) string {
	if v == absent {
		return "absent"
	}
	return string(v[2:])
}

var model = porcupine.Model{
	Partition: partition,
	Init:      func() interface{} { return absent },
	Step:      step,
	Equal:     func(a, b interface{}) bool { return a == b },
	Hash: func(state interface{}) uint64 {
		h := fnv.New64a()
		_, _ = h.Write([]byte(state.(value)))
		return h.Sum64()
	},
	DescribeOperation: func(in, out interface{}) string {
		op := in.(input)
		result := "?"
		switch o := out.(type) {
		case value:
			result = describe(o)
		case bool:
			result = fmt.Sprint(o)
		case nil:
			result = "ok"
		}
		switch op.Kind {
		case "put":
			return fmt.Sprintf("put(%s, %s) -> %s", describe(op.Key), describe(op.Value), result)
		case "cas":
			return fmt.Sprintf("cas(%s, %s, %s) -> %s", describe(op.Key), describe(op.Expected),
				describe(op.New), result)
		case "write":
			return fmt.Sprintf("write(%s) -> %s", describe(op.Value), result)
		case "read":
			return fmt.Sprintf("read() -> %s", result)
		}
		return fmt.Sprintf("%s(%s) -> %s", op.Kind, describe(op.Key), result)
	},
	DescribeState: func(state interface{}) string { return describe(state.(value)) },
}

func run(args []string, stdin io.Reader, stdout, stderr io.Writer) int {
	flags := flag.NewFlagSet("porcupine", flag.ContinueOnError)
	flags.SetOutput(stderr)
	timeout := flags.Duration("timeout", time.Minute, "give up (exit 2) after this long; 0: never")
	visualize := flags.String("visualize", "", "also write an HTML visualization to this file")
	if err := flags.Parse(args); err != nil {
		return exitError
	}
	if flags.NArg() != 1 {
		fmt.Fprintln(stderr, "usage: porcupine [-timeout 60s] [-visualize out.html] history.json")
		return exitError
	}
	in := stdin
	if name := flags.Arg(0); name != "-" {
		f, err := os.Open(name)
		if err != nil {
			fmt.Fprintf(stdout, "error: %v\n", err)
			return exitError
		}
		defer f.Close()
		in = f
	}
	ops, err := load(in)
	if err != nil {
		fmt.Fprintf(stdout, "error: %v\n", err)
		return exitError
	}
	sort.SliceStable(ops, func(i, j int) bool { return ops[i].Call < ops[j].Call })
	parts := len(partition(ops))
	var result porcupine.CheckResult
	if *visualize != "" {
		var info porcupine.LinearizationInfo
		result, info = porcupine.CheckOperationsVerbose(model, ops, *timeout)
		if err := porcupine.VisualizePath(model, info, *visualize); err != nil {
			fmt.Fprintf(stderr, "cannot write the visualization: %v\n", err)
		}
	} else {
		result = porcupine.CheckOperationsTimeout(model, ops, *timeout)
	}
	summary := fmt.Sprintf("%d operations, %d keys", len(ops), parts)
	switch result {
	case porcupine.Ok:
		fmt.Fprintf(stdout, "linearizable (%s)\n", summary)
		return exitOK
	case porcupine.Illegal:
		fmt.Fprintf(stdout, "not linearizable (%s)\n", summary)
		return exitIllegal
	}
	fmt.Fprintf(stdout, "unknown: timed out after %v (%s)\n", *timeout, summary)
	return exitUnknown
}

func main() {
	os.Exit(run(os.Args[1:], os.Stdin, os.Stdout, os.Stderr))
}
