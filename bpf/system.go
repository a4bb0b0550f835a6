package bpf

import (
	"bufio"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// MinKernel is the oldest kernel the data plane runs on: cgroup bpf_link
// (5.7) and batched map reads (5.6).
const MinKernel = "5.7"

// CgroupV2Root returns the mount point of the cgroup v2 hierarchy, read from
// /proc/self/mountinfo: /sys/fs/cgroup on a unified system,
// /sys/fs/cgroup/unified on a hybrid one.
func CgroupV2Root() (string, error) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return "", fmt.Errorf("find cgroup v2 mount: %w", err)
	}
	defer f.Close()
	return cgroup2FromMountinfo(f)
}

// cgroup2FromMountinfo returns the first cgroup2 mount point in a
// mountinfo(5) listing.
func cgroup2FromMountinfo(r io.Reader) (string, error) {
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 0, 64*1024), 1024*1024)
	for sc.Scan() {
		// 41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
		left, right, ok := strings.Cut(sc.Text(), " - ")
		if !ok {
			continue
		}
		fstype, _, _ := strings.Cut(right, " ")
		fields := strings.Fields(left)
		if fstype == "cgroup2" && len(fields) >= 5 {
			return unescapeMountinfo(fields[4]), nil
		}
	}
	if err := sc.Err(); err != nil {
		return "", fmt.Errorf("read mountinfo: %w", err)
	}
	return "", fmt.Errorf("%w: mount one with `mount -t cgroup2 none /sys/fs/cgroup/unified`, "+
		"or boot with systemd.unified_cgroup_hierarchy=1", ErrNoCgroup2)
}

// unescapeMountinfo undoes the octal escapes (\040 for a space) of mountinfo.
func unescapeMountinfo(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			if n, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(n))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// checkCgroup2 reports whether path is a directory of a cgroup v2 filesystem.
func checkCgroup2(path string) error {
	var st unix.Statfs_t
	if err := unix.Statfs(path, &st); err != nil {
		return fmt.Errorf("cgroup %s: %w", path, err)
	}
	if st.Type != unix.CGROUP2_SUPER_MAGIC {
		return fmt.Errorf("%w: %s (use the cgroup2 mount point, see `grep cgroup2 /proc/self/mountinfo`)",
			ErrNotCgroup2, path)
	}
	return nil
}

// checkBPFFS reports whether dir lies on a bpf filesystem.
func checkBPFFS(dir string) error {
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err != nil {
		return fmt.Errorf("pin directory %s: %w", dir, err)
	}
	if st.Type != unix.BPF_FS_MAGIC {
		return fmt.Errorf("%w: %s (mount it with `mount -t bpf bpf /sys/fs/bpf`)", ErrNotBPFFS, dir)
	}
	return nil
}

// checkKernel compares a uname release such as "6.1.0-18-amd64" with
// MinKernel.
func checkKernel(release string) error {
	major, minor, ok := parseRelease(release)
	if !ok {
		return nil // an unknown scheme: let the loader find out
	}
	if major < 5 || major == 5 && minor < 7 {
		return fmt.Errorf("%w: running %s, need %s or newer for cgroup bpf links", ErrKernelTooOld, release, MinKernel)
	}
	return nil
}

func parseRelease(release string) (major, minor int, ok bool) {
	parts := strings.SplitN(release, ".", 3)
	if len(parts) < 2 {
		return 0, 0, false
	}
	major, err1 := strconv.Atoi(parts[0])
	end := strings.IndexFunc(parts[1], func(r rune) bool { return r < '0' || r > '9' })
	if end < 0 {
		end = len(parts[1])
	}
	minor, err2 := strconv.Atoi(parts[1][:end]) // "7-rc1" -> 7
	return major, minor, err1 == nil && err2 == nil
}

func kernelRelease() string {
	var u unix.Utsname
	if err := unix.Uname(&u); err != nil {
		return ""
	}
	return unix.ByteSliceToString(u.Release[:])
}

// MountBPFFS mounts a bpf filesystem at /sys/fs/bpf when pinPath lies below
// it and nothing is mounted there yet, as systemd does on most machines.
func MountBPFFS(pinPath string) error {
	const root = "/sys/fs/bpf"
	if rel, err := filepath.Rel(root, pinPath); err != nil || strings.HasPrefix(rel, "..") {
		return nil
	}
	var st unix.Statfs_t
	if err := unix.Statfs(root, &st); err != nil || st.Type == unix.BPF_FS_MAGIC {
		return nil
	}
	if err := unix.Mount("bpf", root, "bpf", 0, ""); err != nil {
		return permission(fmt.Errorf("mount bpffs at %s: %w", root, err))
	}
	return nil
}
