// Package pgtest starts throwaway PostgreSQL clusters for the fleet tests
// and benchmark: initdb and pg_ctl of Debian's postgresql package, run as
// the postgres user (initdb refuses root) in a temporary directory, serving
// on a Unix socket only. Everything is removed in t.Cleanup.
//
// Proxy puts a TCP port in front of a cluster that a test can cut, as a
// network partition would: open connections stall, new ones hang.
package pgtest

import (
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// Bin returns the directory of the newest installed PostgreSQL's programs.
func Bin() (string, error) {
	dirs, _ := filepath.Glob("/usr/lib/postgresql/*/bin")
	sort.Slice(dirs, func(i, j int) bool {
		vi, _ := strconv.Atoi(filepath.Base(filepath.Dir(dirs[i])))
		vj, _ := strconv.Atoi(filepath.Base(filepath.Dir(dirs[j])))
		return vi < vj
	})
	for i := len(dirs) - 1; i >= 0; i-- {
		if _, err := os.Stat(filepath.Join(dirs[i], "initdb")); err == nil {
			return dirs[i], nil
		}
	}
	return "", errors.New("no PostgreSQL server installed (/usr/lib/postgresql/*/bin/initdb): run `make test-deps` (Debian's postgresql package)")
}

// Cluster is a running throwaway PostgreSQL cluster.
type Cluster struct {
	Dir    string // the data directory
	Socket string // the directory of its Unix socket
	Port   int
	bin    string
	uid    int
	gid    int
	log    string
}

// Options of Start.
type Options struct {
	// MaxConnections is max_connections (default 100).
	MaxConnections int
	// Settings are more postgresql.conf lines.
	Settings []string
}

// Start creates and starts a cluster; it is stopped and removed in
// t.Cleanup. It needs root (to run as postgres) or to be postgres.
func Start(t testing.TB, o Options) *Cluster {
	t.Helper()
	bin, err := Bin()
	if err != nil {
		t.Fatal(err)
	}
	u, err := user.Lookup("postgres")
	if err != nil {
		t.Fatalf("no postgres user (Debian's postgresql package creates it): %v", err)
	}
	uid, _ := strconv.Atoi(u.Uid)
	gid, _ := strconv.Atoi(u.Gid)
	root, err := os.MkdirTemp("", "bwpg-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(root) })
	c := &Cluster{Dir: filepath.Join(root, "data"), Socket: filepath.Join(root, "sock"), Port: 5432, bin: bin, uid: uid, gid: gid,
		log: filepath.Join(root, "server.log")}
	for _, d := range []string{c.Socket} {
		if err := os.Mkdir(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	for _, p := range []string{root, c.Socket} {
		if err := os.Chown(p, uid, gid); err != nil {
			t.Fatal(err)
		}
	}
	os.Chmod(root, 0o755)
	if out, err := c.run("initdb", "-D", c.Dir, "-U", "postgres", "--auth=trust", "-E", "UTF8", "--locale=C", "--no-sync"); err != nil {
		t.Fatalf("initdb: %v\n%s", err, out)
	}
	if o.MaxConnections == 0 {
		o.MaxConnections = 100
	}
	conf := []string{
		"listen_addresses = ''",
		"unix_socket_directories = '" + c.Socket + "'",
		fmt.Sprintf("max_connections = %d", o.MaxConnections),
		"fsync = on",
	}
	conf = append(conf, o.Settings...)
	f, err := os.OpenFile(filepath.Join(c.Dir, "postgresql.conf"), os.O_APPEND|os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	f.WriteString("\n" + strings.Join(conf, "\n") + "\n")
	f.Close()
	c.start(t)
	t.Cleanup(func() { c.run("pg_ctl", "-D", c.Dir, "-m", "immediate", "-w", "stop") })
	return c
}

func (c *Cluster) run(prog string, args ...string) ([]byte, error) {
	cmd := exec.Command(filepath.Join(c.bin, prog), args...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uint32(c.uid), Gid: uint32(c.gid)}}
	cmd.Dir = "/"
	cmd.Env = []string{"PATH=/usr/bin:/bin", "LC_ALL=C"}
	return cmd.CombinedOutput()
}

func (c *Cluster) start(t testing.TB) {
	t.Helper()
	if out, err := c.run("pg_ctl", "-D", c.Dir, "-l", c.log, "-w", "-t", "60", "start"); err != nil {
		logData, _ := os.ReadFile(c.log)
		t.Fatalf("pg_ctl start: %v\n%s\n%s", err, out, logData)
	}
}

// DSN returns a key=value connection string to database db.
func (c *Cluster) DSN(db string) string {
	return fmt.Sprintf("host=%s port=%d user=postgres dbname=%s sslmode=disable", c.Socket, c.Port, db)
}

// SocketPath is the Unix socket's file.
func (c *Cluster) SocketPath() string {
	return filepath.Join(c.Socket, fmt.Sprintf(".s.PGSQL.%d", c.Port))
}

// CreateDB creates a database and returns its DSN.
func (c *Cluster) CreateDB(t testing.TB, name string) string {
	t.Helper()
	if out, err := c.run("psql", "-h", c.Socket, "-U", "postgres", "-d", "postgres", "-v", "ON_ERROR_STOP=1", "-c", "CREATE DATABASE "+name); err != nil {
		t.Fatalf("create database %s: %v\n%s", name, err, out)
	}
	return c.DSN(name)
}

// SQL runs statements with psql in database db and returns the output
// (unaligned, tuples only).
func (c *Cluster) SQL(t testing.TB, db, sql string) string {
	t.Helper()
	out, err := c.run("psql", "-h", c.Socket, "-U", "postgres", "-d", db, "-v", "ON_ERROR_STOP=1", "-At", "-c", sql)
	if err != nil {
		t.Fatalf("psql %q: %v\n%s", sql, err, out)
	}
	return strings.TrimSpace(string(out))
}

// Kill kills the postmaster with SIGKILL, as a crash would (its backends
// end with it), and waits until it is gone.
func (c *Cluster) Kill(t testing.TB) {
	t.Helper()
	data, err := os.ReadFile(filepath.Join(c.Dir, "postmaster.pid"))
	if err != nil {
		t.Fatal(err)
	}
	pid, _ := strconv.Atoi(strings.SplitN(string(data), "\n", 2)[0])
	syscall.Kill(pid, syscall.SIGKILL)
	for deadline := time.Now().Add(10 * time.Second); syscall.Kill(pid, 0) == nil; time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("postmaster survived SIGKILL")
		}
	}
	// Its backends notice the postmaster's death and exit.
	time.Sleep(200 * time.Millisecond)
}

// Stop stops the cluster (fast shutdown).
func (c *Cluster) Stop(t testing.TB) {
	t.Helper()
	if out, err := c.run("pg_ctl", "-D", c.Dir, "-m", "fast", "-w", "stop"); err != nil {
		t.Fatalf("pg_ctl stop: %v\n%s", err, out)
	}
}

// Restart starts a stopped or killed cluster again (crash recovery after
// Kill).
func (c *Cluster) Restart(t testing.TB) {
	t.Helper()
	os.Remove(filepath.Join(c.Dir, "postmaster.pid"))
	c.start(t)
}

// Proxy is a Unix socket in a directory of its own forwarding to a
// cluster's, which a test can cut. A Unix socket reaches across network
// namespaces, so agents in a namespace of their own reach it.
type Proxy struct {
	Dir    string
	ln     net.Listener
	target string
	mu     sync.Mutex
	cut    bool
	conns  map[net.Conn]bool
}

// NewProxy starts a proxy to the cluster; it closes in t.Cleanup.
func (c *Cluster) NewProxy(t testing.TB) *Proxy {
	t.Helper()
	dir, err := os.MkdirTemp("", "bwpgproxy-")
	if err != nil {
		t.Fatal(err)
	}
	os.Chmod(dir, 0o755)
	ln, err := net.Listen("unix", filepath.Join(dir, fmt.Sprintf(".s.PGSQL.%d", c.Port)))
	if err != nil {
		t.Fatal(err)
	}
	p := &Proxy{Dir: dir, ln: ln, target: c.SocketPath(), conns: map[net.Conn]bool{}}
	t.Cleanup(func() { ln.Close(); p.Cut(); p.Restore(); os.RemoveAll(dir) })
	go p.serve()
	return p
}

// DSN returns a key=value connection string to db through the proxy.
func (p *Proxy) DSN(db string) string {
	return fmt.Sprintf("host=%s port=5432 user=postgres dbname=%s sslmode=disable connect_timeout=2", p.Dir, db)
}

func (p *Proxy) serve() {
	for {
		c, err := p.ln.Accept()
		if err != nil {
			return
		}
		p.mu.Lock()
		p.conns[c] = true
		cut := p.cut
		p.mu.Unlock()
		if cut {
			continue // a black hole: accepted, never answered
		}
		go p.forward(c)
	}
}

func (p *Proxy) forward(c net.Conn) {
	s, err := net.Dial("unix", p.target)
	if err != nil {
		c.Close()
		return
	}
	p.mu.Lock()
	p.conns[s] = true
	p.mu.Unlock()
	var wg sync.WaitGroup
	pipe := func(dst, src net.Conn) {
		defer wg.Done()
		buf := make([]byte, 32<<10)
		for {
			n, err := src.Read(buf)
			if n > 0 && !p.isCut() {
				if _, werr := dst.Write(buf[:n]); werr != nil {
					break
				}
			}
			if err != nil {
				break
			}
		}
		dst.Close()
		src.Close()
	}
	wg.Add(2)
	go pipe(s, c)
	go pipe(c, s)
	wg.Wait()
	p.mu.Lock()
	delete(p.conns, c)
	delete(p.conns, s)
	p.mu.Unlock()
}

// Cut partitions the network: the open connections go silent (what either
// side sends goes nowhere), and new ones are accepted but never answered.
func (p *Proxy) Cut() {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.cut = true
}

// Restore ends the partition: the silent connections are reset (as a peer
// would after a long partition) and new ones are forwarded.
func (p *Proxy) Restore() {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.cut = false
	for c := range p.conns {
		c.Close()
		delete(p.conns, c)
	}
}

func (p *Proxy) isCut() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.cut
}
