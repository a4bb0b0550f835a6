#!/bin/sh
# Prints the version of this source tree, for the binaries (bwagent version,
# bwctl version) and the Debian package: the last vX.Y.Z tag as X.Y.Z, with
# +N.gHASH when N commits follow it; without a tag 0.0.0+gitDATE.HASH (the
# commit's date first, so that later commits make greater versions);
# outside git 0.0.0.
set -eu
cd "$(dirname "$0")/.."
if d=$(git describe --tags --match 'v[0-9]*' 2>/dev/null); then
	echo "$d" | sed -e 's/^v//' -e 's/-\([0-9]*\)-g\([0-9a-f]*\)$/+\1.g\2/'
elif h=$(git log -1 --format='%cd.%h' --date=format:%Y%m%d 2>/dev/null); then
	echo "0.0.0+git$h"
else
	echo 0.0.0
fi
