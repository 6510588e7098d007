"""(b)(c)(e): template snapshot + restore variants. Usage: snapshot_test.py [q35|microvm] [exec|fd] [sandbox]"""
import sys, time, os, subprocess, shutil
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cove_exp import *

machine = sys.argv[1] if len(sys.argv) > 1 else 'q35'
how = sys.argv[2] if len(sys.argv) > 2 else 'exec'
sandbox = sys.argv[3] if len(sys.argv) > 3 else 'on'
common = dict(machine=machine, accel='tcg,thread=multi', sandbox=sandbox)
print('== machine=%s migration-uri=%s sandbox=%s' % (machine, how, sandbox))

TPL_MEM = '/dev/shm/cove-tpl'
STATE = EXP + '/tpl.state'
for p in (TPL_MEM, STATE):
    if os.path.exists(p): os.unlink(p)
new_overlay('tpl')
vm = VM('tpl', **common)
vm.connect_agent()
hello = vm.readline(60)
print('template booted: first agent msg at %.3fs: %s' % (vm.since(), hello))
for _ in range(5):
    last = vm.readline()
print('template last line before snapshot:', last)
dt, st = snapshot(vm, STATE, how)
print('snapshot (stop+migrate, x-ignore-shared): %.1f ms, status %s, ram transferred %s B, total-time %s ms' % (
    dt * 1000, st['status'], st.get('ram', {}).get('transferred'), st.get('total-time')))
vm.quit()
print('state file %d bytes; memory file apparent %d MiB, du %d KiB' % (
    os.path.getsize(STATE), os.path.getsize(TPL_MEM) >> 20, du_kib(TPL_MEM)))
tpl_sum = sha(TPL_MEM)
# the template disk becomes a read-only backing file of every restored sandbox
os.chmod(EXP + '/tpl.qcow2', 0o444)
last_n = int(last.split()[1])


def check_continues(vm, label):
    vm.connect_agent()
    t = vm.since()
    line = vm.readline(20)
    t2 = vm.since()
    n = int(line.split()[1]) if line.startswith('tick') else -1
    lines = [vm.readline(10) for _ in range(3)]
    ok = n > last_n
    print('  %s: first agent line %.3fs after exec (connected at %.3fs): %r (template stopped at tick %d) -> %s; then %r' % (
        label, t2, t, line, last_n, 'CONTINUED' if ok else 'NOT CONTINUED', lines[-1]))
    return ok


results = {}
def trial(label, prepare, share='on', mem_opts=''):
    name = 'r-' + label
    mem = '/dev/shm/cove-' + name
    if os.path.exists(mem): os.unlink(mem)
    new_overlay(name, backing=EXP + '/tpl.qcow2')
    t = time.monotonic()
    mem = prepare(mem)
    tcopy = time.monotonic() - t
    vm = None
    try:
        vm, trun, st = restore(name, STATE, how, mem_path=mem, share=share + mem_opts, **common)
        print('%-14s copy %6.1f ms, QEMU exec->running %6.1f ms (status after incoming: %s), total %6.1f ms; mem du %s KiB' % (
            label, tcopy * 1000, trun * 1000, st, (tcopy + trun) * 1000, du_kib(mem)))
        ok = check_continues(vm, label)
        results[label] = (tcopy, trun, ok)
    except Exception as e:
        print('%-14s FAILED: %r' % (label, e))
        if vm: print('  stderr:', vm.stderr()[-800:]); print('  console tail:', vm.console()[-400:])
        results[label] = None
    if vm: vm.quit()
    return mem

def cp_plain(dst): subprocess.run(['cp', TPL_MEM, dst], check=True); return dst
def cp_sparse(dst): subprocess.run(['cp', '--sparse=always', TPL_MEM, dst], check=True); return dst
def cp_reflink_auto(dst): subprocess.run(['cp', '--reflink=auto', TPL_MEM, dst], check=True); return dst
def no_copy(dst): return TPL_MEM

for m in (trial('cp', cp_plain), trial('cp-sparse', cp_sparse)):
    os.unlink(m)
trial('private', no_copy, share='off')
s1 = sha(TPL_MEM)
print('  template memory file unchanged after share=off run: %s (%s -> %s)' % (s1 == tpl_sum, tpl_sum, s1))
trial('private-ro', no_copy, share='off', mem_opts=',readonly=on')
s2 = sha(TPL_MEM)
print('  template memory file unchanged after share=off,readonly=on run: %s' % (s2 == tpl_sum))
# a second sandbox from the same template must still see the template's memory
trial('private-2nd', no_copy, share='off')
print('  template memory file unchanged: %s' % (sha(TPL_MEM) == tpl_sum))
os.chmod(EXP + '/tpl.qcow2', 0o644)
