#!/usr/bin/env bash
# Fetch the real development clips of DATA.md into data/videos/ (git-ignored) from the package registries only.
#   bash data/fetch_real_videos.sh            # physics-lab clips (python3-mecavideo .deb, 4 MB)
#   bash data/fetch_real_videos.sh --bbb      # also Big Buck Bunny (moviepy 2.2.1 sdist, 57 MB download)
# Then: python data/videos_to_shards.py data/videos/mecavideo data/shards/mecavideo --clip-frames 32 --max-fps 25 \
#         --short-side 128
#   (as data/README.md; --max-fps 25 keeps the 187 fps vp9 clip to a rate the stages' 9 frames at 8 fps fit)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=data/videos
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
mkdir -p "$OUT/mecavideo"

if [ -z "$(ls -A "$OUT/mecavideo" 2>/dev/null)" ]; then
  echo "fetching python3-mecavideo (.deb, not installed: only unpacked)"
  if ! (cd "$TMP" && apt-get download python3-mecavideo >/dev/null 2>&1); then
    echo "apt-get download failed; running apt-get update first (may need root)"
    apt-get update >/dev/null
    (cd "$TMP" && apt-get download python3-mecavideo)
  fi
  dpkg-deb -x "$TMP"/python3-mecavideo_*.deb "$TMP/deb"
  cp "$TMP"/deb/usr/share/pymecavideo/data/video/* "$OUT/mecavideo/"
fi
echo "mecavideo clips: $(ls "$OUT/mecavideo" | tr '\n' ' ')"

if [ "${1:-}" = "--bbb" ] && [ ! -f "$OUT/bbb/bbb.mp4" ]; then
  echo "fetching Big Buck Bunny from the moviepy==2.2.1 sdist"
  PIP="${PIP:-.venv/bin/pip}"; [ -x "$PIP" ] || PIP=pip
  "$PIP" download --no-deps --no-binary :all: moviepy==2.2.1 -d "$TMP" >/dev/null
  tar -xzf "$TMP"/moviepy-2.2.1.tar.gz -C "$TMP" moviepy-2.2.1/docs/_static/medias/getting_started/moviepy_10_minutes/moviepy_10_minutes.zip
  mkdir -p "$OUT/bbb"
  python3 -c "import zipfile,sys; z=zipfile.ZipFile(sys.argv[1]); open(sys.argv[2],'wb').write(z.read('moviepy_10_minutes/resources/bbb.mp4'))" \
    "$TMP"/moviepy-2.2.1/docs/_static/medias/getting_started/moviepy_10_minutes/moviepy_10_minutes.zip "$OUT/bbb/bbb.mp4"
  echo "bbb: $OUT/bbb/bbb.mp4"
fi
