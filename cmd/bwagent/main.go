// Command bwagent is the bandwidth quota agent: it attaches the per-UID
// accounting programs, keeps the agent's nftables table, and repairs both
// every tick.
//
//	bwagent [flags]            run the agent (as root)
//	bwagent uninstall [flags]  detach the programs, remove pins and the table
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

	"github.com/myvpn/bwagent/agent"
	"github.com/myvpn/bwagent/bpf"
	"github.com/myvpn/bwagent/nft"
)

func main() {
	log := slog.New(slog.NewTextHandler(os.Stderr, nil))
	if err := run(os.Args[1:], log); err != nil {
		log.Error("bwagent", "err", err)
		os.Exit(1)
	}
}

func run(args []string, log *slog.Logger) error {
	uninstall := len(args) > 0 && args[0] == "uninstall"
	if uninstall {
		args = args[1:]
	}
	fs := flag.NewFlagSet("bwagent", flag.ContinueOnError)
	var (
		dpc      bpf.Config
		fwc      nft.Config
		interval = fs.Duration("interval", agent.DefaultInterval, "tick interval, 1s to 5s")
	)
	fs.StringVar(&dpc.PinPath, "pin-path", bpf.DefaultPinPath, "bpffs directory for the pinned maps and links")
	fs.StringVar(&dpc.CgroupPath, "cgroup", "", "cgroup v2 directory to attach to (default: the cgroup v2 root)")
	fs.StringVar(&fwc.Table, "table", "bwagent", "name of the agent's nftables table (family inet)")
	maxUIDs := fs.Uint("max-uids", bpf.DefaultMaxUIDs, "number of UIDs the kernel maps hold")
	if err := fs.Parse(args); err != nil {
		return err
	}
	dpc.MaxUIDs = uint32(*maxUIDs)

	if uninstall {
		fw, err := nft.New(fwc)
		if err != nil {
			return err
		}
		defer fw.Close()
		return errors.Join(bpf.Uninstall(dpc.PinPath), fw.Remove())
	}

	if _, err := agent.CheckInterval(*interval); err != nil {
		return fmt.Errorf("-interval: %w", err)
	}
	if err := bpf.MountBPFFS(dpc.PinPath); err != nil {
		return err
	}
	dp, err := bpf.Load(dpc)
	if err != nil {
		return err
	}
	defer dp.Close() // pins stay: the kernel keeps counting while we are away
	fw, err := nft.New(fwc)
	if err != nil {
		return err
	}
	defer fw.Close()
	a, err := agent.New(*interval, dp, fw, log)
	if err != nil {
		return err
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	log.Info("bwagent running", "cgroup", dp.CgroupPath(), "pins", dp.PinPath(), "table", fwc.Table, "interval", *interval)
	return a.Run(ctx)
}
