"""Experiment harness: boot / template snapshot / restore of a Cove guest under QEMU (TCG)."""
import atexit, json, os, socket, subprocess, sys, time, shutil, hashlib

_procs = []


@atexit.register
def _kill_leftovers():
    for p in _procs:
        if p.poll() is None:
            p.kill(); p.wait()

CACHE = os.environ.get('CACHE_DIR', '/var/cache/cove')
EXP = CACHE + '/exp'
KERNEL = CACHE + '/kernel/vmlinuz'
INITRD = EXP + '/initramfs.cpio.gz'
BASE = CACHE + '/rootfs/rootfs.qcow2'
SANDBOX_STRICT = 'on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny'


def host_tsc_khz():
    for line in open('/proc/cpuinfo'):
        if line.startswith('cpu MHz'):
            return int(float(line.split(':')[1]) * 1000)
    return 0


def qemu_args(name, machine='q35', accel='tcg,thread=multi', mem_path=None, share='on',
              mode='loop', incoming=False, sandbox='on', mem='512M', overlay=None, extra=()):
    d = '/tmp/cove-' + name
    mem_path = mem_path or '/dev/shm/cove-' + name
    overlay = overlay or EXP + '/' + name + '.qcow2'
    a = ['qemu-system-x86_64']
    if machine == 'microvm':
        a += ['-machine', 'microvm,memory-backend=mem']
        blk, ser = 'virtio-blk-device', 'virtio-serial-device'
        # microvm has no HPET/PM timer: TSC calibration against the PIT sometimes fails under TCG
        # (guest hangs early, ~1 boot in 8). The TCG guest TSC runs at the host TSC rate, so tell it.
        khz = host_tsc_khz()
        if khz:
            mode = mode + ' tsc_early_khz=%d' % khz
    else:
        a += ['-machine', machine + ',memory-backend=mem']
        blk, ser = 'virtio-blk-pci', 'virtio-serial-pci'
    a += ['-accel', accel, '-cpu', 'max', '-smp', '1', '-m', mem,
          '-nodefaults', '-no-user-config', '-nographic',
          '-object', 'memory-backend-file,id=mem,size=%s,mem-path=%s,share=%s' % (mem, mem_path, share),
          '-kernel', KERNEL, '-initrd', INITRD,
          '-append', 'console=ttyS0 %s panic=-1 cove.mode=%s' % (os.environ.get('COVE_KLOG', 'quiet'), mode),
          '-serial', 'file:%s.console' % d,
          '-drive', 'file=%s,if=none,id=root,format=qcow2,cache=unsafe' % overlay, '-device', blk + ',drive=root',
          '-device', ser, '-chardev', 'socket,id=agent,path=%s.sock,server=on,wait=off' % d,
          '-device', 'virtserialport,chardev=agent,name=cove.agent',
          '-qmp', 'unix:%s.qmp,server=on,wait=off' % d, '-no-reboot']
    if sandbox:
        a += ['-sandbox', sandbox]
    if incoming:
        a += ['-incoming', 'defer']
    return a + list(extra)


def connect_unix(path, timeout=30):
    end = time.monotonic() + timeout
    while True:
        try:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(path)
            return s
        except (FileNotFoundError, ConnectionRefusedError):
            s.close()
            if time.monotonic() > end:
                raise
            time.sleep(0.002)


class QMP:
    def __init__(self, path):
        self.s = connect_unix(path)
        self.f = self.s.makefile('rwb', buffering=0)
        self.events = []
        json.loads(self.f.readline())
        self.cmd('qmp_capabilities')

    def cmd(self, execute, fds=None, **args):
        msg = json.dumps({'execute': execute, 'arguments': args}).encode() + b'\n'
        if fds:
            self.s.sendmsg([msg], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, bytes(memoryview(__import__('array').array('i', fds))))])
        else:
            self.f.write(msg)
        while True:
            r = json.loads(self.f.readline())
            if 'event' in r:
                self.events.append(r)
                continue
            if 'error' in r:
                raise RuntimeError('%s: %s' % (execute, r['error']))
            return r['return']


class VM:
    def __init__(self, name, **kw):
        self.name = name
        self.d = '/tmp/cove-' + name
        for suf in ('.sock', '.qmp', '.console'):
            try: os.unlink(self.d + suf)
            except FileNotFoundError: pass
        self.args = qemu_args(name, **kw)
        self.t0 = time.monotonic()
        self.p = subprocess.Popen(self.args, stdin=subprocess.DEVNULL, stderr=open(self.d + '.stderr', 'w'))
        _procs.append(self.p)
        self.qmp = QMP(self.d + '.qmp')
        self.agent = None
        self.buf = b''

    def since(self):
        return time.monotonic() - self.t0

    def connect_agent(self):
        self.agent = connect_unix(self.d + '.sock')
        return self.agent

    def readline(self, timeout=60):
        self.agent.settimeout(timeout)
        while b'\n' not in self.buf:
            d = self.agent.recv(4096)
            if not d:
                raise EOFError('agent socket closed')
            self.buf += d
        line, self.buf = self.buf.split(b'\n', 1)
        return line.decode(errors='replace')

    def wait_status(self, want, timeout=60):
        end = time.monotonic() + timeout
        while True:
            st = self.qmp.cmd('query-status')['status']
            if st == want:
                return
            if time.monotonic() > end:
                raise TimeoutError('status %s, want %s' % (st, want))
            time.sleep(0.001)

    def console(self):
        try: return open(self.d + '.console', errors='replace').read()
        except FileNotFoundError: return ''

    def stderr(self):
        return open(self.d + '.stderr').read()

    def quit(self):
        try:
            self.qmp.cmd('quit')
        except Exception:
            pass
        try:
            self.p.wait(5)
        except subprocess.TimeoutExpired:
            self.p.kill(); self.p.wait()


def new_overlay(name, backing=BASE):
    path = EXP + '/' + name + '.qcow2'
    subprocess.run(['qemu-img', 'create', '-q', '-f', 'qcow2', '-F', 'qcow2', '-b', backing, path], check=True)
    return path


def sha(path):
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        while True:
            b = f.read(1 << 20)
            if not b: break
            h.update(b)
    return h.hexdigest()[:16]


def du_kib(path):
    return int(subprocess.check_output(['du', '-k', path]).split()[0])


def snapshot(vm, state_path, how='exec'):
    """stop + migrate device state (x-ignore-shared); returns seconds taken."""
    q = vm.qmp
    q.cmd('migrate-set-capabilities', capabilities=[{'capability': 'x-ignore-shared', 'state': True}])
    t = time.monotonic()
    q.cmd('stop')
    if how == 'exec':
        q.cmd('migrate', uri='exec:cat > %s' % state_path)
    else:  # fd passed over QMP with SCM_RIGHTS (works with -sandbox spawn=deny)
        fd = os.open(state_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        q.cmd('getfd', fds=[fd], fdname='mig')
        os.close(fd)
        q.cmd('migrate', uri='fd:mig')
    while True:
        st = q.cmd('query-migrate')
        if st.get('status') in ('completed', 'failed', 'cancelled'):
            break
        time.sleep(0.001)
    dt = time.monotonic() - t
    if st['status'] != 'completed':
        raise RuntimeError('migration %s: %s' % (st['status'], st))
    return dt, st


def restore(name, state_path, how='exec', **kw):
    """start QEMU -incoming defer, load state, cont; returns (vm, seconds from process start to running)."""
    vm = VM(name, incoming=True, **kw)
    q = vm.qmp
    q.cmd('migrate-set-capabilities', capabilities=[{'capability': 'x-ignore-shared', 'state': True}])
    if how == 'exec':
        q.cmd('migrate-incoming', uri='exec:cat %s' % state_path)
    else:
        fd = os.open(state_path, os.O_RDONLY)
        q.cmd('getfd', fds=[fd], fdname='mig')
        os.close(fd)
        q.cmd('migrate-incoming', uri='fd:mig')
    while True:
        st = q.cmd('query-status')['status']
        if st != 'inmigrate':
            break
        time.sleep(0.001)
    if st != 'paused':
        # incoming migration may land in 'postmigrate'/'paused'; anything else is an error
        pass
    q.cmd('cont')
    vm.wait_status('running')
    return vm, vm.since(), st
