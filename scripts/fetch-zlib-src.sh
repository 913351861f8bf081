#!/usr/bin/env bash
# Fetches the zlib sources (Debian's source package for the machine's release, the
# upstream tarball inside it) for the distcc demo and test, cached.
#
#   scripts/fetch-zlib-src.sh [OUTDIR]   (default: ${CARGO_TARGET_DIR:-target}/zlib-src)
#
# Prints the path of the unpacked upstream tree (configure, Makefile.in, test/).
# apt runs with a private state directory and a deb-src list made from the machine's
# own configured sources (its release suite only), so the host's apt is left alone.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
out="${1:-${CARGO_TARGET_DIR:-$root/target}/zlib-src}"
suite="${SUITE:-bookworm}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
exec 9>"$out/.lock"
flock 9

tree="$(find "$out" -mindepth 1 -maxdepth 1 -type d -name 'zlib-*' | head -n1)"
if [ -n "$tree" ] && [ -f "$tree/configure" ]; then
    echo "$tree"
    exit 0
fi

apt_dir="$out/apt"
mkdir -p "$apt_dir/lists/partial" "$apt_dir/cache/archives/partial"
: >"$apt_dir/src.sources"
for f in /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] || continue
    # deb822 stanzas of the plain release suite, turned into deb-src.
    awk -v s="$suite" 'BEGIN { RS = ""; ORS = "\n\n" } $0 ~ ("Suites:[^\n]*(^| )" s "( |\n|$)") { print }' "$f" \
        | sed -e 's/^Types: .*/Types: deb-src/' -e "s/^Suites: .*/Suites: $suite/" >>"$apt_dir/src.sources"
done
if [ -f /etc/apt/sources.list ]; then
    awk -v s="$suite" '$1 == "deb" && $3 == s { $1 = "deb-src"; print }' /etc/apt/sources.list >"$apt_dir/src.list"
fi
[ -s "$apt_dir/src.sources" ] || [ -s "$apt_dir/src.list" ] || {
    echo "fetch-zlib-src: no apt source for $suite in /etc/apt" >&2
    exit 1
}
[ -s "$apt_dir/src.sources" ] || rm -f "$apt_dir/src.sources"
opts=(-o "Dir::Etc::SourceParts=$apt_dir" -o "Dir::Etc::SourceList=/dev/null"
    -o "Dir::State::Lists=$apt_dir/lists" -o "Dir::Cache=$apt_dir/cache"
    -o "APT::Sandbox::User=root")
apt-get -qq "${opts[@]}" update >&2
(cd "$out" && apt-get -qq "${opts[@]}" source --download-only zlib >&2)
tarball="$(ls "$out"/zlib_*.orig.tar.* | head -n1)"
tar -xf "$tarball" -C "$out"
tree="$(find "$out" -mindepth 1 -maxdepth 1 -type d -name 'zlib-*' | head -n1)"
[ -f "$tree/configure" ] || { echo "fetch-zlib-src: no configure in $tarball" >&2; exit 1; }
echo "$tree"
