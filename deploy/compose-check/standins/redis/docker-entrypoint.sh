#!/bin/sh
# Stand-in for the official redis image's entrypoint (see the Dockerfile beside this):
# as root, give /data to redis and run the command as redis; otherwise just run it.
set -eu
if [ "$(id -u)" = 0 ] && [ "${1:-}" = redis-server ]; then
    chown -R redis:redis /data
    exec setpriv --reuid=redis --regid=redis --init-groups "$@"
fi
exec "$@"
