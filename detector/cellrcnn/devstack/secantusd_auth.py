"""SecantusDB for a local Girder, with authentication from its first moment. Run by the Girder virtualenv's python
(which has secantusdb), as a script: cellrcnn never imports it.

``python secantusd_auth.py PORT USER PASSWORD_FILE``: an in-memory SecantusDB on 127.0.0.1:PORT (``secantusd-py
--storage-path :memory: --standalone --auth``) that answers nothing but the handshake before a client authenticates
(SCRAM-SHA-256), with one user, USER (role ``root``), whose password is the first line of PASSWORD_FILE (never on
the command line, where every user of the machine could read it).

``secantusd-py`` itself makes users only through ``createUser`` on a server started without ``--auth``, then
restarted with it: the database would be open to every user of the machine meanwhile, and an in-memory one would not
survive the restart. Here SecantusDB's own ``createUser`` makes the user before the server takes its first
connection. Stops on SIGTERM or SIGINT, as ``secantusd-py`` does. Written for secantusdb 0.7.0b3, the version
``local_girder.GIRDER_PIP`` pins: it calls that version's ``createUser`` handler directly.
"""

import logging
import signal
import sys

from secantus.commands import CommandContext, _create_user  # noqa: PLC2701 (no public way before it listens)
from secantus.cursors import CursorRegistry
from secantus.server import SecantusDBServer


def main(port, user, password_file):
    """Serve until SIGTERM or SIGINT."""
    logging.basicConfig(level=logging.INFO, format='%(asctime)s %(levelname)s %(name)s: %(message)s')
    with open(password_file, encoding='utf-8') as f:
        password = f.readline().strip()
    server = SecantusDBServer('127.0.0.1', int(port), ':memory:', replica_set_name=None, require_auth=True,
                              enable_test_commands=False)
    context = CommandContext(connection_id=0, storage=server.storage, cursors=CursorRegistry(), db_name='admin')
    made = _create_user({'createUser': user, 'pwd': password, 'roles': [{'role': 'root', 'db': 'admin'}]}, context)
    if made.get('ok') != 1.0:
        server.storage.close()
        sys.exit(f'secantusd_auth: cannot make the database user {user}: {made.get("errmsg")}')

    def stop(signum, frame):
        server.stop()
        sys.exit(0)

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    server.start()
    server.wait()


if __name__ == '__main__':
    main(*sys.argv[1:])
