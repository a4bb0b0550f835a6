// Command bwagent is the bandwidth quota agent. It attaches the per-UID
// accounting programs, keeps the agent's nftables table, turns counters into
// usage every tick, blocks users over their limit and keeps the operators'
// files (usage JSON, marker files, block log) up to date.
//
//	bwagent [--config FILE]            run the agent (as root)
//	bwagent print-config [--config F]  print the effective configuration
//	bwagent uninstall [--config FILE]  detach the programs, remove pins and the table
//	bwagent version                    print the version
//
// Prometheus metrics are served at http://127.0.0.1:9477/metrics by default
// ([metrics] in the configuration).
//
// Every setting has a working default; see config/example.toml. SIGHUP
// reloads the configuration and the limits file; SIGTERM commits the last
// counts and exits.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"syscall"
	"time"
	_ "time/tzdata" // time zones work on systems without tzdata

	"github.com/myvpn/bwagent/agent"
	"github.com/myvpn/bwagent/bpf"
	"github.com/myvpn/bwagent/config"
	"github.com/myvpn/bwagent/control"
	"github.com/myvpn/bwagent/control/agentbackend"
	"github.com/myvpn/bwagent/fleet"
	"github.com/myvpn/bwagent/internal/passwd"
	"github.com/myvpn/bwagent/nft"
	"github.com/myvpn/bwagent/store"
)

func main() {
	log := newLogger(os.Stderr)
	if err := run(os.Args[1:], log); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			os.Exit(2)
		}
		log.Error("bwagent", "err", err)
		os.Exit(1)
	}
}

func run(args []string, log *slog.Logger) error {
	if len(args) == 1 && args[0] == "version" {
		_, err := fmt.Printf("bwagent %s\n", version)
		return err
	}
	cmd := ""
	if len(args) > 0 && (args[0] == "uninstall" || args[0] == "print-config") {
		cmd, args = args[0], args[1:]
	}
	fs := flag.NewFlagSet("bwagent", flag.ContinueOnError)
	path := fs.String("config", "", "configuration file (default "+config.DefaultPath+", used if it exists)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("unexpected argument %q (commands: uninstall, print-config, version)", fs.Arg(0))
	}
	cfg, err := config.Load(*path)
	if err != nil {
		return err
	}
	switch cmd {
	case "print-config":
		_, err := os.Stdout.WriteString(cfg.String())
		return err
	case "uninstall":
		return uninstall(cfg)
	}
	return serve(cfg, *path, log)
}

func dataplaneConfig(cfg config.Config) bpf.Config {
	return bpf.Config{CgroupPath: cfg.Kernel.Cgroup, PinPath: cfg.Kernel.PinPath,
		MaxUIDs: cfg.Kernel.MaxUIDs, ProtectedUIDs: cfg.Kernel.ProtectedUIDs}
}

func firewallConfig(cfg config.Config) nft.Config {
	return nft.Config{Table: cfg.NFT.Table, Set: cfg.NFT.Set, Chain: cfg.NFT.Chain, Protected: cfg.Kernel.ProtectedUIDs}
}

// openFleet returns the fleet client of [fleet] (nil without), connected
// if the database answers within a few seconds. A database of a newer
// schema, a node name another running agent holds or another metric stop
// the start; an unreachable database does not: the agent enforces each
// limit locally until it answers, and says so.
func openFleet(cfg config.Config, log *slog.Logger) (*fleet.Client, error) {
	if !cfg.Fleet.Enabled() {
		return nil, nil
	}
	node := cfg.Fleet.Node
	if node == "" {
		h, err := os.Hostname()
		if err != nil || !config.ValidNodeName(h) {
			return nil, fmt.Errorf("fleet.node: the host name %q is no valid node name; set fleet.node", h)
		}
		node = h
	}
	c := fleet.New(fleet.Options{DSN: cfg.Fleet.Database, Node: node, Metric: cfg.Rules().Metric, Version: version,
		Fresh: max(5*cfg.Interval, 10*time.Second)})
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	err := c.Open(ctx)
	switch {
	case fleet.Fatal(err):
		return nil, fmt.Errorf("fleet: %w", err)
	case err != nil:
		log.Warn("fleet database unreachable at start: enforcing each limit locally on the usage this node knows until it answers (other nodes may use the same remainder meanwhile); retrying every tick",
			"database", fleet.Describe(cfg.Fleet.Database), "node", node, "err", err)
	default:
		log.Info("fleet mode", "database", fleet.Describe(cfg.Fleet.Database), "node", node)
	}
	return c, nil
}

func uninstall(cfg config.Config) error {
	fw, err := nft.New(firewallConfig(cfg))
	if err != nil {
		return err
	}
	defer fw.Close()
	return errors.Join(bpf.Uninstall(cfg.Kernel.PinPath), fw.Remove())
}

func serve(cfg config.Config, path string, log *slog.Logger) error {
	if os.Getenv("GOMEMLIMIT") == "" {
		// Keep the soft memory limit a little above the live heap, which
		// grows with the users, with room for what the agent allocates:
		// every second.
		var ml agent.MemoryLimiter
		ml.Update(time.Now())
		go func() {
			for now := range time.Tick(time.Second) {
				ml.Update(now)
			}
		}()
	}
	if err := bpf.MountBPFFS(cfg.Kernel.PinPath); err != nil {
		return err
	}
	dp, err := bpf.Load(dataplaneConfig(cfg))
	if err != nil {
		return err
	}
	defer dp.Close() // pins stay: the kernel keeps counting while we are away
	fw, err := nft.New(firewallConfig(cfg))
	if err != nil {
		return err
	}
	defer fw.Close()
	st, err := store.Open(cfg.Paths.StateDB)
	if err != nil {
		return err
	}
	defer st.Close()
	mx := newMetricsServer(cfg.Metrics)
	notes := openNotifications(cfg, st, log)   // notify.go
	sm := newServiceManager(log, cfg.Interval) // systemd's notify protocol
	defer sm.close()
	var xk agent.XrayKernel
	if dp.SupportsServerTagging() { // Linux 6.0: claims of Xray's connections
		xk = dp
	}
	fc, err := openFleet(cfg, log)
	if err != nil {
		return err
	}
	if fc != nil {
		defer fc.Close()
	}
	a, err := agent.New(agent.Options{Config: cfg, Dataplane: dp, Sessions: dp, XrayKernel: xk, Firewall: fw, Store: st, Log: log,
		Observers: append(mx.observers(), sm), Fleet: fc})
	if err != nil {
		return err
	}

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	// SIGHUP is caught from now on (its default action would kill the
	// agent) but handled only once the loop runs.
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)

	runErr := make(chan error, 1)
	go func() { runErr <- a.Run(ctx) }()
	select {
	case <-a.Ready(): // the first tick is done: the kernel enforces
	case err := <-runErr:
		return err
	}
	notes.start(ctx)
	defer notes.wait() // before the state database closes
	go func() {
		for range hup {
			next, err := config.Load(path)
			if err != nil {
				log.Error("reload refused; keeping the running configuration", "err", err)
				continue
			}
			if err := a.Reload(ctx, next); err != nil {
				log.Error("reload refused; keeping the running configuration", "err", err)
				continue
			}
			notes.reload(next)
			log.Info("configuration reloaded")
		}
	}()

	// Metrics, once the first tick gave them something to read.
	metricsDone := mx.start(ctx, a, log)

	// The control socket, for bwctl, opens last: every change goes through
	// the agent's loop like a limit crossing.
	passwdPath := cfg.Paths.Passwd
	srv := control.NewServer(notes.backend(agentbackend.New(a)), control.Options{
		AdminGroup: cfg.Control.AdminGroup,
		ErrorCodes: agentbackend.ErrorCodes,
		// A caller's account is looked up where the agent finds its SSH
		// users, so "your own usage" means the same account to both.
		LookupUser: func(uid uint32) (string, error) { return passwd.NameOf(passwdPath, uid) },
		Refused: func(method string, c control.Caller) {
			log.Warn("control call refused", "method", method, "uid", c.UID, "pid", c.PID)
		},
		Failed: func(method string, c control.Caller, err error) {
			log.Error("control call failed", "method", method, "uid", c.UID, "err", err)
		},
	})
	// A socket that cannot be served (another agent on the same path) is
	// reported at once; the agent goes on enforcing without it.
	serveErr := make(chan error, 1)
	go func() {
		err := srv.Serve(ctx, cfg.Paths.Socket)
		if err != nil {
			log.Error("control socket not served; bwctl cannot reach this agent", "socket", cfg.Paths.Socket, "err", err)
		}
		serveErr <- err
	}()
	sm.ready(ctx, a.Users, cfg.Paths.Socket)

	log.Info("bwagent running", "version", version, "cgroup", dp.CgroupPath(), "pins", dp.PinPath(), "table", cfg.NFT.Table,
		"interval", cfg.Interval, "state", cfg.Paths.StateDB, "limits", cfg.Paths.Limits, "socket", cfg.Paths.Socket)
	err = <-runErr
	stop()
	<-serveErr
	<-metricsDone
	log.Info("bwagent stopped")
	return err
}
