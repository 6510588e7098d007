"""(d): what a guest process polling /dev/vportNp1 sees across host disconnect/reconnect and snapshot/restore.
Guest side is vporttest.py (run as PID 1 in the Debian rootfs); its log goes to the serial console file."""
import sys, time, os
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cove_exp import *

machine = sys.argv[1] if len(sys.argv) > 1 else 'q35'
common = dict(machine=machine, mode='py', sandbox=SANDBOX_STRICT)
TPL_MEM = '/dev/shm/cove-pt'; STATE = EXP + '/pt.state'
for p in (TPL_MEM, STATE):
    if os.path.exists(p): os.unlink(p)
new_overlay('pt')

def mark(vm, what):
    print('host %.3f (vm +%.3fs): %s' % (time.monotonic(), vm.since(), what))

def recv_some(vm, secs):
    end = time.monotonic() + secs; out = b''
    vm.agent.settimeout(0.1)
    while time.monotonic() < end:
        try:
            d = vm.agent.recv(4096)
            if not d: out += b'<EOF>'; break
            out += d
        except socket.timeout:
            pass
    return out

vm = VM('pt', **common)
time.sleep(6)  # guest boots and opens the port with no host connected
mark(vm, 'connect #1')
vm.connect_agent()
print('  got:', recv_some(vm, 2.5))
vm.agent.sendall(b'echo one\n')
print('  after echo:', recv_some(vm, 1.5))
mark(vm, 'disconnect'); vm.agent.close()
time.sleep(3)
mark(vm, 'connect #2'); vm.connect_agent()
print('  got:', recv_some(vm, 2.5))
mark(vm, 'disconnect before snapshot'); vm.agent.close()
time.sleep(2)
dt, st = snapshot(vm, STATE, 'fd')
mark(vm, 'snapshot done in %.1f ms' % (dt * 1000))
vm.quit()
print('---- template console (guest view):')
print('\n'.join(l for l in vm.console().splitlines() if 'vporttest' in l or 'init:' in l))

new_overlay('pr', backing=EXP + '/pt.qcow2')
vm2, trun, _ = restore('pr', STATE, 'fd', mem_path=TPL_MEM, share='off', **common)
mark(vm2, 'restored, running after %.1f ms' % (trun * 1000))
time.sleep(3)
mark(vm2, 'connect after restore'); vm2.connect_agent()
t = time.monotonic()
vm2.agent.sendall(b'echo two\n')
vm2.agent.settimeout(5); got = b''
while b'echoed two' not in got:
    got += vm2.agent.recv(4096)
print('  echo round trip right after connecting: %.1f ms (%r)' % ((time.monotonic() - t) * 1000, got))
print('  then:', recv_some(vm2, 1.5))
# a restore + immediate connect + echo, measured from QEMU exec
new_overlay('pr2', backing=EXP + '/pt.qcow2')
vm3, trun3, _ = restore('pr2', STATE, 'fd', mem_path=TPL_MEM, share='off', **common)
vm3.connect_agent(); vm3.agent.sendall(b'echo three\n'); vm3.agent.settimeout(5); got = b''
while b'echoed three' not in got:
    got += vm3.agent.recv(4096)
print('  restore #2: running at %.1f ms, echo reply at %.1f ms after QEMU exec' % (trun3 * 1000, vm3.since() * 1000))
vm3.quit()
vm2.agent.close()
time.sleep(1.5)
vm2.quit()
print('---- restored console (guest view):')
print('\n'.join(l for l in vm2.console().splitlines() if 'vporttest' in l))
