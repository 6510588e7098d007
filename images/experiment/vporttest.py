# Runs as PID 1 in the Debian rootfs. Observes the virtio-serial port across host
# disconnect/reconnect (and snapshot/restore). Logs every change to /dev/ttyS0 (console file).
import os, select, signal, sys, time, fcntl
port = sys.argv[1]
con = open('/dev/ttyS0', 'w', buffering=1)
def log(*a):
    con.write('vporttest %.3f ' % time.clock_gettime(time.CLOCK_MONOTONIC) + ' '.join(map(str, a)) + '\n')
fd = os.open(port, os.O_RDWR | os.O_NONBLOCK)
log('opened', port)
# ask for SIGIO on port events (host connect/disconnect, data); wait for it while the host is away
signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGIO])
fcntl.fcntl(fd, fcntl.F_SETOWN, os.getpid())
fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_ASYNC)
def wait_sigio(t):
    si = signal.sigtimedwait([signal.SIGIO], t)
    if si: log('SIGIO received (si_code %d)' % si.si_code)
    return si
p = select.poll()
p.register(fd, select.POLLIN)   # POLLHUP/POLLERR are always reported
last = None; n = 0; same = 0; lastw = 0; last_read0 = None; last_werr = None
while True:
    now = time.monotonic()
    ev = p.poll(max(0, int((lastw + 1.0 - now) * 1000)))
    rev = ev[0][1] if ev else 0
    names = [k for k in ('POLLIN', 'POLLOUT', 'POLLHUP', 'POLLERR') if rev & getattr(select, k)]
    if ev and rev != last:
        log('poll revents', rev, names, '(previous repeated %d times)' % same)
        last = rev; same = 0
    elif ev:
        same += 1
    if rev & select.POLLIN:
        try:
            d = os.read(fd, 4096)
            if d or rev != last_read0:
                log('read', len(d), repr(d[:80]))
            last_read0 = rev if not d else None
            if d.startswith(b'echo '):
                os.write(fd, b'echoed ' + d[5:])
            if not d:
                wait_sigio(1.0)   # read()==0 repeats at once while the host is disconnected
        except OSError as e:
            log('read error', e)
    elif rev & select.POLLHUP:
        wait_sigio(1.0)
    now = time.monotonic()
    if now - lastw >= 1.0:
        lastw = now; n += 1
        try:
            w = os.write(fd, b'py tick %d\n' % n)
            if n % 5 == 0 or w <= 0 or last_werr: log('write tick', n, '->', w)
            last_werr = None
        except OSError as e:
            if last_werr != e.errno: log('write tick', n, 'error', e)
            last_werr = e.errno
