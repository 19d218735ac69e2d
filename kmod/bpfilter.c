// SPDX-License-Identifier: GPL-2.0
/*
 * bpfilter.ko: iptables' socket options (IPv4 and IPv6) and
 * /proc/net/ip{,6}_tables_names, answered by a user-space helper that turns
 * rulesets into BPF programs attached at the netfilter hooks.
 *
 * The helper is embedded in the module (bpfilter_umh_blob.S), written to
 * umh_path and started as a usermode helper; it serves requests through
 * /dev/bpfilter (protocol: bpfilter_proto.h), several at a time. A helper that dies
 * or stalls is replaced on the next request; the BPF objects it attached stay
 * pinned, and keep filtering, until its successor takes them over. Unloading
 * asks the helper to detach everything and exit.
 */
#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/bpf.h>
#include <linux/btf.h>
#include <linux/btf_ids.h>
#include <linux/compat.h>
#include <linux/file.h>
#include <linux/fs.h>
#include <linux/fs_struct.h>
#include <linux/icmp.h>
#include <linux/miscdevice.h>
#include <linux/poll.h>
#include <linux/module.h>
#include <linux/mount.h>
#include <linux/namei.h>
#include <linux/netfilter/xt_addrtype.h>
#include <linux/netfilter.h>
#include <linux/netfilter_ipv4/ip_tables.h>
#include <linux/netfilter_ipv4/ipt_REJECT.h>
#include <linux/netfilter_ipv6.h>
#include <linux/netfilter_ipv6/ip6_tables.h>
#include <linux/netfilter_ipv6/ip6t_REJECT.h>
#include <linux/pid.h>
#include <linux/proc_fs.h>
#include <linux/refcount.h>
#include <linux/sched/signal.h>
#include <linux/seq_file.h>
#include <linux/seq_file_net.h>
#include <linux/slab.h>
#include <linux/sockptr.h>
#include <linux/string.h>
#include <linux/umh.h>
#include <linux/unaligned.h>
#include <linux/wait.h>
#include <linux/workqueue.h>
#include <net/dst_metadata.h>
#include <net/ip6_route.h>
#include <net/ipv6.h>
#include <net/net_namespace.h>
#include <net/netns/generic.h>
#include <net/netfilter/nf_conntrack.h>
#include <net/netfilter/ipv4/nf_reject.h>
#include <net/netfilter/ipv6/nf_reject.h>
#include <net/route.h>
#include <net/sock.h>

#include "bpfilter_nat.h"
#include "bpfilter_xtmatch.h"
#include "bpfilter_proto.h"

#define BPFILTER_DEVICE		"/dev/bpfilter"
/* The helper's refusals explain themselves; a log line needs no more. */
#define BPFILTER_MSG_MAX	1024

static char *umh_path = "/run/bpfilter-umh";
module_param(umh_path, charp, 0444);
MODULE_PARM_DESC(umh_path, "where the embedded helper is written, root-only, to be started");

static unsigned int timeout = 60;
module_param(timeout, uint, 0644);
MODULE_PARM_DESC(timeout, "seconds the helper has to start or to answer before it is killed");

extern const char bpfilter_umh_start[], bpfilter_umh_end[];

struct bpfilter_call {
	refcount_t ref;		/* the caller's, and the queue's while outstanding */
	struct list_head node;	/* in bpfilter.queue, then bpfilter.sent */
	struct bpfilter_request req;
	void *payload;		/* req.len bytes */
	struct net *net;	/* the caller's, for netns_fd; NULL for SHUTDOWN */
	struct bpfilter_reply rep;
	void *reply;		/* rep.len bytes */
	int err;		/* why there is no reply */
	bool sent;		/* read whole by the helper: in bpfilter.sent */
	bool done;
};

static struct {
	struct mutex spawn_lock;	/* one spawn at a time */
	struct mutex lock;		/* everything below */
	wait_queue_head_t helper_wq;	/* the helper waiting for a request */
	wait_queue_head_t caller_wq;	/* callers waiting for the helper or a reply */
	struct pid *spawned;		/* what call_usermodehelper started */
	struct pid *helper;		/* the process serving through helper_file */
	struct file *helper_file;
	int open_files;			/* helper_file and files of helpers we killed */
	/*
	 * Outstanding calls: queued, oldest first, until the helper has read them
	 * whole (the first may be partly read: read_pos), then sent until their
	 * reply is in. A reply's header is gathered in rep, then names its call by
	 * id (writing), whose payload follows.
	 */
	struct list_head queue;
	struct list_head sent;
	size_t read_pos;
	struct bpfilter_reply rep;
	struct bpfilter_call *writing;
	size_t write_pos;
	u32 next_id;
	bool ready;
	bool exiting;
	bool closed;			/* unloading, and the helper was told: no more opens */
} bpfilter = {
	.spawn_lock = __MUTEX_INITIALIZER(bpfilter.spawn_lock),
	.lock = __MUTEX_INITIALIZER(bpfilter.lock),
	.helper_wq = __WAIT_QUEUE_HEAD_INITIALIZER(bpfilter.helper_wq),
	.caller_wq = __WAIT_QUEUE_HEAD_INITIALIZER(bpfilter.caller_wq),
	.queue = LIST_HEAD_INIT(bpfilter.queue),
	.sent = LIST_HEAD_INIT(bpfilter.sent),
};

static unsigned long bpfilter_timeout(void)
{
	return max(READ_ONCE(timeout), 1U) * HZ;
}

static struct bpfilter_call *bpfilter_call_new(u16 op, u32 family, int optname,
					       struct net *net, u32 len, u32 optlen)
{
	struct bpfilter_call *call = kzalloc(sizeof(*call), GFP_KERNEL);

	if (!call)
		return NULL;
	if (len) {
		call->payload = kvmalloc(len, GFP_KERNEL_ACCOUNT);
		if (!call->payload) {
			kfree(call);
			return NULL;
		}
	}
	refcount_set(&call->ref, 1);
	INIT_LIST_HEAD(&call->node);
	call->req = (struct bpfilter_request) {
		.magic = BPFILTER_MAGIC,
		.version = BPFILTER_PROTO_VERSION,
		.op = op,
		.family = family,
		.optname = optname,
		.pid = task_pid_nr(current),
		.len = len,
		.netns_fd = -1,
		.optlen = optlen,
	};
	if (net) {
		call->net = get_net(net);
		call->req.netns_cookie = net->net_cookie;
		call->req.netns_inum = net->ns.inum;
	}
	return call;
}

static void bpfilter_call_put(struct bpfilter_call *call)
{
	if (!refcount_dec_and_test(&call->ref))
		return;
	if (call->net)
		put_net(call->net);
	kvfree(call->payload);
	kvfree(call->reply);
	kfree(call);
}

/* Ends an outstanding call, answered (err 0) or not; bpfilter.lock held. */
static void bpfilter_finish(struct bpfilter_call *call, int err)
{
	if (call == bpfilter.writing) {
		bpfilter.writing = NULL;
		bpfilter.write_pos = 0;
	}
	if (list_first_entry_or_null(&bpfilter.queue, struct bpfilter_call, node) == call)
		bpfilter.read_pos = 0;
	list_del_init(&call->node);
	call->err = err;
	WRITE_ONCE(call->done, true);
	wake_up_all(&bpfilter.caller_wq);
	bpfilter_call_put(call);
}

/* Ends every outstanding call unanswered: the helper is gone. bpfilter.lock held. */
static void bpfilter_finish_all(int err)
{
	struct bpfilter_call *call, *next;

	list_for_each_entry_safe(call, next, &bpfilter.sent, node)
		bpfilter_finish(call, err);
	list_for_each_entry_safe(call, next, &bpfilter.queue, node)
		bpfilter_finish(call, err);
	bpfilter.write_pos = 0;
}

/* bpfilter.lock held. */
static bool bpfilter_outstanding(void)
{
	return !list_empty(&bpfilter.queue) || !list_empty(&bpfilter.sent);
}

/* bpfilter.lock held. */
static void bpfilter_forget_helper(void)
{
	WRITE_ONCE(bpfilter.helper_file, NULL);
	put_pid(bpfilter.helper);
	bpfilter.helper = NULL;
	put_pid(bpfilter.spawned);
	bpfilter.spawned = NULL;
	/* A reader of a file that is no longer the helper's must give up. */
	wake_up_all(&bpfilter.helper_wq);
}

/* bpfilter.lock held. */
static void bpfilter_kill(int err)
{
	struct task_struct *p;

	if (bpfilter.helper)
		kill_pid(bpfilter.helper, SIGKILL, 1);
	/*
	 * PyInstaller's bootloader runs the service in a child, which may not
	 * have opened the device yet: orphaned, it would go on starting up. What
	 * the bootloader unpacked stays behind (it does not clean up after a
	 * killed child either): the next helper removes it (transport/device.py).
	 */
	if (bpfilter.spawned) {
		rcu_read_lock();
		for_each_process(p)
			if (task_tgid(rcu_dereference(p->real_parent)) == bpfilter.spawned)
				send_sig(SIGKILL, p, 1);
		rcu_read_unlock();
		kill_pid(bpfilter.spawned, SIGKILL, 1);
	}
	bpfilter_finish_all(err);
	bpfilter_forget_helper();
}

/* bpfilter.lock held. */
static bool bpfilter_spawned_alive(void)
{
	return bpfilter.spawned && pid_has_task(bpfilter.spawned, PIDTYPE_TGID);
}

static int bpfilter_unlink(const char *path)
{
	const char *name = kbasename(path);
	struct dentry *dentry;
	struct path dir;
	char *dirname;
	int err;

	dirname = kstrndup(path, name - path, GFP_KERNEL);
	if (!dirname)
		return -ENOMEM;
	err = kern_path(dirname, LOOKUP_DIRECTORY, &dir);
	kfree(dirname);
	if (err)
		return err;
	err = mnt_want_write(dir.mnt);
	if (err)
		goto out;
#ifdef BPFILTER_HAVE_START_REMOVING
	/* the parent locked and the name looked up in one call; ENOENT if absent */
	dentry = start_removing(mnt_idmap(dir.mnt), dir.dentry, &QSTR(name));
	if (IS_ERR(dentry)) {
		err = PTR_ERR(dentry);
	} else {
		err = vfs_unlink(mnt_idmap(dir.mnt), d_inode(dir.dentry), dentry, NULL);
		end_removing(dentry);
	}
#else
	inode_lock_nested(d_inode(dir.dentry), I_MUTEX_PARENT);
#ifdef BPFILTER_HAVE_LOOKUP_NOPERM
	dentry = lookup_noperm(&QSTR(name), dir.dentry);
#else
	dentry = lookup_one_len(name, dir.dentry, strlen(name));
#endif
	if (IS_ERR(dentry)) {
		err = PTR_ERR(dentry);
	} else {
		if (d_really_is_positive(dentry))
			err = vfs_unlink(mnt_idmap(dir.mnt), d_inode(dir.dentry), dentry, NULL);
		else
			err = -ENOENT;
		dput(dentry);
	}
	inode_unlock(d_inode(dir.dentry));
#endif
	mnt_drop_write(dir.mnt);
out:
	path_put(&dir);
	return err;
}

static int bpfilter_write_umh(void)
{
	size_t size = bpfilter_umh_end - bpfilter_umh_start;
	struct file *file;
	loff_t pos = 0;
	ssize_t n;
	int err;

	/*
	 * A fresh file, never the old one: a helper from it may still be running
	 * (ETXTBSY), and whatever was at the path is not trusted.
	 */
	err = bpfilter_unlink(umh_path);
	if (err && err != -ENOENT)
		return err;
	file = filp_open(umh_path, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_LARGEFILE, 0700);
	if (IS_ERR(file))
		return PTR_ERR(file);
	err = 0;
	while (pos < size) {
		n = kernel_write(file, bpfilter_umh_start + pos, size - pos, &pos);
		if (n <= 0) {
			err = n ? n : -EIO;
			break;
		}
	}
	filp_close(file, NULL);
	/*
	 * exec refuses a file that is still open for writing (ETXTBSY), and a
	 * kernel thread's last fput is deferred: complete it now.
	 */
	flush_delayed_fput();
	if (err)
		bpfilter_unlink(umh_path);
	return err;
}

struct bpfilter_umh_work {
	struct work_struct work;
	bool remove;
	int err;
};

#ifndef scoped_with_init_fs
/* kernels whose kernel threads share init's filesystem have no such scope */
#define scoped_with_init_fs()
#endif

static void bpfilter_umh_work_fn(struct work_struct *work)
{
	struct bpfilter_umh_work *w = container_of(work, struct bpfilter_umh_work, work);

	/* a kernel thread's own root may be an empty filesystem: resolve in init's */
	scoped_with_init_fs()
		w->err = w->remove ? bpfilter_unlink(umh_path) : bpfilter_write_umh();
}

/*
 * The file is written and removed by a kernel thread: it resolves umh_path in
 * the filesystem a usermode helper is started in (init's), whoever loaded or
 * unloads the module, and its root credentials do not depend on theirs.
 */
static int bpfilter_umh_file(bool remove)
{
	struct bpfilter_umh_work w = { .remove = remove };

	INIT_WORK_ONSTACK(&w.work, bpfilter_umh_work_fn);
	schedule_work(&w.work);
	flush_work(&w.work);
	destroy_work_on_stack(&w.work);
	return w.err;
}

/*
 * A usermode helper starts without stdin, stdout and stderr: the helper's
 * first files would take their numbers, and anything printing to stderr (a
 * Python traceback, the bootloader) would write into them. Its output goes to
 * the kernel log instead.
 */
static void bpfilter_umh_stdio(void)
{
	static const char * const paths[] = { "/dev/null", "/dev/kmsg", "/dev/kmsg" };
	struct file *file;
	int fd, i;

	for (i = 0; i < ARRAY_SIZE(paths); i++) {
		fd = get_unused_fd_flags(0);
		if (fd < 0)
			return;
		if (fd != i) {
			put_unused_fd(fd);
			return;
		}
		file = filp_open(paths[i], i ? O_WRONLY : O_RDONLY, 0);
		if (IS_ERR(file)) {
			put_unused_fd(fd);
			return;
		}
		fd_install(fd, file);
	}
}

/* Runs in the new process, before it executes the helper. */
static int bpfilter_umh_setup(struct subprocess_info *info, struct cred *new)
{
	bpfilter_umh_stdio();
	mutex_lock(&bpfilter.lock);
	put_pid(bpfilter.spawned);
	bpfilter.spawned = get_pid(task_tgid(current));
	mutex_unlock(&bpfilter.lock);
	return 0;
}

/* bpfilter.spawn_lock held, bpfilter.lock not. */
static int bpfilter_spawn(void)
{
	char *argv[] = { umh_path, "serve", "--device", BPFILTER_DEVICE, NULL };
	char *envp[] = { "HOME=/", "PATH=/sbin:/bin:/usr/sbin:/usr/bin", NULL, NULL };
	struct subprocess_info *info;
	char *tmpdir;
	int err;

	err = bpfilter_umh_file(false);
	if (err) {
		pr_err("cannot write the helper to %s: error %d\n", umh_path, err);
		return err;
	}
	/*
	 * PyInstaller's bootloader unpacks the helper's libraries into TMPDIR and
	 * maps them executable: beside the helper, where executing is allowed (it is
	 * executed from there), not in a /tmp that may be mounted noexec.
	 */
	tmpdir = kasprintf(GFP_KERNEL, "TMPDIR=%.*s", (int)(kbasename(umh_path) - umh_path),
			   umh_path);
	if (!tmpdir)
		return -ENOMEM;
	envp[2] = tmpdir;
	info = call_usermodehelper_setup(umh_path, argv, envp, GFP_KERNEL,
					 bpfilter_umh_setup, NULL, NULL);
	if (!info) {
		kfree(tmpdir);
		return -ENOMEM;
	}
	err = call_usermodehelper_exec(info, UMH_WAIT_EXEC);
	kfree(tmpdir);
	mutex_lock(&bpfilter.lock);
	if (err) {
		pr_err("cannot start the helper %s: error %d\n", umh_path, err);
		put_pid(bpfilter.spawned);
		bpfilter.spawned = NULL;
	} else {
		pr_info("started the helper %s (pid %d)\n", umh_path, pid_nr(bpfilter.spawned));
	}
	mutex_unlock(&bpfilter.lock);
	return err;
}

/*
 * Waits until a helper serves the device, starting one if none is running.
 * bpfilter.lock held, dropped while waiting.
 */
static int bpfilter_wait_ready(void)
{
	unsigned long deadline = jiffies + bpfilter_timeout();
	bool spawned = false;
	long ret;
	int err;

	for (;;) {
		if (bpfilter.helper_file)
			return 0;
		if (!bpfilter_spawned_alive()) {
			if (spawned) {
				pr_err("the helper exited before it opened " BPFILTER_DEVICE "\n");
				return -EPIPE;
			}
			/* one spawn at a time: the others find it started */
			mutex_unlock(&bpfilter.lock);
			if (mutex_lock_killable(&bpfilter.spawn_lock)) {
				mutex_lock(&bpfilter.lock);
				return -EINTR;
			}
			mutex_lock(&bpfilter.lock);
			err = 0;
			if (!bpfilter.helper_file && !bpfilter_spawned_alive()) {
				mutex_unlock(&bpfilter.lock);
				err = bpfilter_spawn();
				mutex_lock(&bpfilter.lock);
				spawned = true;
			}
			mutex_unlock(&bpfilter.spawn_lock);
			if (err)
				return err;
			continue;
		}
		if (time_after_eq(jiffies, deadline)) {
			if (bpfilter.helper_file)
				pr_err("the helper did not answer within %u s: killing it\n", timeout);
			else
				pr_err("the helper did not open " BPFILTER_DEVICE " within %u s: killing it\n",
				       timeout);
			bpfilter_kill(-ETIMEDOUT);
			return -ETIMEDOUT;
		}
		mutex_unlock(&bpfilter.lock);
		/* Polled: nothing tells us when a helper dies before it opens the device. */
		ret = wait_event_killable_timeout(bpfilter.caller_wq,
						  READ_ONCE(bpfilter.helper_file), HZ / 10);
		mutex_lock(&bpfilter.lock);
		if (ret < 0)
			return -EINTR;
	}
}

/*
 * Sends a call and waits for its reply: 0 with call->rep filled in, or -errno.
 * Calls from any number of callers are outstanding at once, each with its id;
 * the helper answers them in any order.
 */
static int bpfilter_transact(struct bpfilter_call *call)
{
	struct bpfilter_call *first;
	long ret;
	int err;

	mutex_lock(&bpfilter.lock);
	err = bpfilter_wait_ready();
	if (err)
		goto out;
	refcount_inc(&call->ref);
	call->req.id = bpfilter.next_id++;
	list_add_tail(&call->node, &bpfilter.queue);
	wake_up_interruptible(&bpfilter.helper_wq);
	mutex_unlock(&bpfilter.lock);

	ret = wait_event_killable_timeout(bpfilter.caller_wq, READ_ONCE(call->done),
					  bpfilter_timeout());
	mutex_lock(&bpfilter.lock);
	if (!call->done) {
		first = list_first_entry_or_null(&bpfilter.queue, struct bpfilter_call, node);
		if (!ret) {
			pr_err("the helper did not answer within %u s (op %u, optname %d): killing it\n",
			       timeout, call->req.op, call->req.optname);
			bpfilter_kill(-ETIMEDOUT);
		} else if (!call->sent && !(call == first && bpfilter.read_pos)) {
			bpfilter_finish(call, -EINTR);
		}
		/*
		 * Otherwise the helper has begun to read it: it stays outstanding,
		 * its reply to be discarded, so that the stream stays in step.
		 */
	}
	err = call->done ? call->err : -EINTR;
out:
	mutex_unlock(&bpfilter.lock);
	return err;
}

/* The helper's answer to a transacted call, its message (if any) logged. */
static int bpfilter_status(const struct bpfilter_call *call)
{
	/* the caller decides how often there is one: a flood must not fill the log */
	if (call->rep.status < 0 && call->rep.len)
		pr_info_ratelimited("%.*s\n", (int)min_t(u32, call->rep.len, BPFILTER_MSG_MAX),
				    (const char *)call->reply);
	return call->rep.status;
}

static int bpfilter_may_call(struct sock *sk)
{
	if (!ns_capable(sock_net(sk)->user_ns, CAP_NET_ADMIN))
		return -EPERM;
	/* The helper reads the native layout; ip_tables translates 32-bit callers'. */
	if (in_compat_syscall())
		return -EOPNOTSUPP;
	if (!READ_ONCE(bpfilter.ready))
		return -EAGAIN;
	return 0;
}

/*
 * IPT_SO_SET_REPLACE hands back the replaced table's counters through
 * ipt_replace.counters. As in ip_tables, the new table is in place by now: a
 * fault is only worth a warning.
 */
static int bpfilter_put_counters(const struct bpfilter_call *call)
{
	const struct ipt_replace *repl = call->payload;

	BUILD_BUG_ON(offsetof(struct ipt_replace, counters) !=
		     offsetof(struct ip6t_replace, counters));
	BUILD_BUG_ON(offsetof(struct ipt_replace, num_counters) !=
		     offsetof(struct ip6t_replace, num_counters));
	if (!call->rep.len)
		return 0;
	if (call->req.len < sizeof(*repl) ||
	    call->rep.len > (u64)repl->num_counters * sizeof(struct xt_counters)) {
		pr_err("the helper returned %u bytes of counters for a replace of %u\n",
		       call->rep.len, call->req.len < sizeof(*repl) ? 0 : repl->num_counters);
		return -EIO;
	}
	if (copy_to_user(repl->counters, call->reply, call->rep.len))
		net_warn_ratelimited("bpfilter: counters copy to user failed while replacing table\n");
	return 0;
}

static int bpfilter_set(struct sock *sk, int optname, sockptr_t arg, unsigned int len,
			u32 family)
{
	struct bpfilter_call *call;
	int err;

	err = bpfilter_may_call(sk);
	if (err)
		return err;
	if (len > BPFILTER_MAX_PAYLOAD)
		return -ENOMEM;
	call = bpfilter_call_new(BPFILTER_OP_SETSOCKOPT, family, optname, sock_net(sk), len, len);
	if (!call)
		return -ENOMEM;
	if (copy_from_sockptr(call->payload, arg, len)) {
		err = -EFAULT;
		goto out;
	}
	err = bpfilter_transact(call);
	if (!err)
		err = bpfilter_status(call);
	if (!err && optname == IPT_SO_SET_REPLACE)
		err = bpfilter_put_counters(call);
out:
	bpfilter_call_put(call);
	return err;
}

static int bpfilter_get(struct sock *sk, int optname, void __user *user, int *len,
			u32 family)
{
	struct bpfilter_call *call;
	u32 reads;
	int err;

	err = bpfilter_may_call(sk);
	if (err)
		return err;
	if (*len < 0)
		return -EINVAL;
	/*
	 * Only what ip_tables would copy from user: the helper checks *len as it does,
	 * and iptables' buffer for the entries (any size the caller says) stays where
	 * it is until the answer is written to it.
	 */
	BUILD_BUG_ON(IP6T_SO_GET_INFO != IPT_SO_GET_INFO ||
		     IP6T_SO_GET_ENTRIES != IPT_SO_GET_ENTRIES);
	BUILD_BUG_ON(sizeof(struct ip6t_getinfo) != sizeof(struct ipt_getinfo) ||
		     sizeof(struct ip6t_get_entries) != sizeof(struct ipt_get_entries));
	reads = bpfilter_get_reads(family, optname, *len);
	call = bpfilter_call_new(BPFILTER_OP_GETSOCKOPT, family, optname, sock_net(sk), reads,
				 *len);
	if (!call)
		return -ENOMEM;
	if (copy_from_user(call->payload, user, reads)) {
		err = -EFAULT;
		goto out;
	}
	err = bpfilter_transact(call);
	if (!err)
		err = bpfilter_status(call);
	if (err)
		goto out;
	if (call->rep.len > *len) {
		pr_err("the helper returned %u bytes for a %d-byte buffer\n", call->rep.len, *len);
		err = -EIO;
	} else if (copy_to_user(user, call->reply, call->rep.len)) {
		err = -EFAULT;
	} else {
		*len = call->rep.len;
	}
out:
	bpfilter_call_put(call);
	return err;
}

static int bpfilter_ipv4_set(struct sock *sk, int optname, sockptr_t arg, unsigned int len)
{
	return bpfilter_set(sk, optname, arg, len, NFPROTO_IPV4);
}

static int bpfilter_ipv4_get(struct sock *sk, int optname, void __user *user, int *len)
{
	return bpfilter_get(sk, optname, user, len, NFPROTO_IPV4);
}

static int bpfilter_ipv6_set(struct sock *sk, int optname, sockptr_t arg, unsigned int len)
{
	return bpfilter_set(sk, optname, arg, len, NFPROTO_IPV6);
}

static int bpfilter_ipv6_get(struct sock *sk, int optname, void __user *user, int *len)
{
	return bpfilter_get(sk, optname, user, len, NFPROTO_IPV6);
}

/* The ranges of ip_tables and ip6_tables, which cannot be loaded beside us. */
static struct nf_sockopt_ops bpfilter_ipv4_sockopts = {
	.pf		= PF_INET,
	.set_optmin	= IPT_BASE_CTL,
	.set_optmax	= IPT_SO_SET_MAX + 1,
	.set		= bpfilter_ipv4_set,
	.get_optmin	= IPT_BASE_CTL,
	.get_optmax	= IPT_SO_GET_MAX + 1,
	.get		= bpfilter_ipv4_get,
	.owner		= THIS_MODULE,
};

static struct nf_sockopt_ops bpfilter_ipv6_sockopts = {
	.pf		= PF_INET6,
	.set_optmin	= IP6T_BASE_CTL,
	.set_optmax	= IP6T_SO_SET_MAX + 1,
	.set		= bpfilter_ipv6_set,
	.get_optmin	= IP6T_BASE_CTL,
	.get_optmax	= IP6T_SO_GET_MAX + 1,
	.get		= bpfilter_ipv6_get,
	.owner		= THIS_MODULE,
};

static const struct file_operations bpfilter_fops;

static int bpfilter_open(struct inode *inode, struct file *file)
{
	struct task_struct *parent;
	struct pid *tgid = task_tgid(current);
	bool ours;
	int err;

	mutex_lock(&bpfilter.lock);
	rcu_read_lock();
	parent = rcu_dereference(current->real_parent);
	/* The service may run in a child of what we started (PyInstaller's bootloader). */
	ours = bpfilter.spawned &&
	       (tgid == bpfilter.spawned || task_tgid(parent) == bpfilter.spawned);
	rcu_read_unlock();
	if (bpfilter.closed) {
		/* the module is going: nothing may begin to use its code */
		err = -ENODEV;
	} else if (!ours) {
		err = -EPERM;
	} else if (bpfilter.helper_file) {
		err = -EBUSY;
	} else {
		err = stream_open(inode, file);
		if (!err) {
			WRITE_ONCE(bpfilter.helper_file, file);
			bpfilter.helper = get_pid(tgid);
			WRITE_ONCE(bpfilter.open_files, bpfilter.open_files + 1);
			wake_up_all(&bpfilter.caller_wq);
			/* last: a failed open puts the file's operations (see bpfilter_fops) */
			replace_fops(file, &bpfilter_fops);
		}
	}
	mutex_unlock(&bpfilter.lock);
	return err;
}

static int bpfilter_release(struct inode *inode, struct file *file)
{
	/*
	 * Put back by __fput() once this has returned (bpfilter_fops.owner): module
	 * exit, which may go on as soon as open_files is 0, waits for it.
	 */
	__module_get(THIS_MODULE);
	mutex_lock(&bpfilter.lock);
	if (bpfilter.helper_file == file) {
		if (bpfilter_outstanding()) {
			struct bpfilter_call *call = list_first_entry_or_null(&bpfilter.sent,
				struct bpfilter_call, node) ?: list_first_entry(&bpfilter.queue,
				struct bpfilter_call, node);

			pr_err("the helper exited without answering (op %u, optname %d)\n",
			       call->req.op, call->req.optname);
			bpfilter_finish_all(-EPIPE);
		} else if (!bpfilter.exiting) {
			pr_warn("the helper exited; the next request starts another\n");
		}
		bpfilter_forget_helper();
	}
	WRITE_ONCE(bpfilter.open_files, bpfilter.open_files - 1);
	wake_up_all(&bpfilter.caller_wq);
	mutex_unlock(&bpfilter.lock);
	return 0;
}

static ssize_t bpfilter_read(struct file *file, char __user *buf, size_t count, loff_t *ppos)
{
	const size_t hdr = sizeof(struct bpfilter_request);
	struct bpfilter_call *call;
	size_t pos, n = 0;
	ssize_t ret;
	int fd;

	mutex_lock(&bpfilter.lock);
	for (;;) {
		if (bpfilter.helper_file != file) {
			ret = -EPIPE;
			goto out;
		}
		call = list_first_entry_or_null(&bpfilter.queue, struct bpfilter_call, node);
		if (call) {
			if (bpfilter.read_pos || !call->net || call->req.netns_fd >= 0)
				break;
			/* Installed here: this runs in the helper, and the number is its own. */
			fd = open_related_ns(&call->net->ns, get_net_ns);
			if (fd >= 0) {
				call->req.netns_fd = fd;
				break;
			}
			pr_err("cannot give the helper the caller's netns: error %d\n", fd);
			bpfilter_finish(call, fd);
			continue;
		}
		mutex_unlock(&bpfilter.lock);
		if (file->f_flags & O_NONBLOCK)
			return -EAGAIN;
		if (wait_event_interruptible(bpfilter.helper_wq,
					     !list_empty_careful(&bpfilter.queue) ||
					     READ_ONCE(bpfilter.helper_file) != file))
			return -ERESTARTSYS;
		mutex_lock(&bpfilter.lock);
	}
	/* one request per read at most: the helper reads each by its header's len */
	pos = bpfilter.read_pos;
	count = min_t(size_t, count, hdr + call->req.len - pos);
	if (pos < hdr) {
		n = min_t(size_t, count, hdr - pos);
		if (copy_to_user(buf, (u8 *)&call->req + pos, n)) {
			ret = -EFAULT;
			goto out;
		}
	}
	if (count > n && copy_to_user(buf + n, call->payload + pos + n - hdr, count - n)) {
		ret = -EFAULT;
		goto out;
	}
	bpfilter.read_pos += count;
	if (bpfilter.read_pos == hdr + call->req.len) {
		bpfilter.read_pos = 0;
		call->sent = true;
		list_move_tail(&call->node, &bpfilter.sent);
	}
	ret = count;
out:
	mutex_unlock(&bpfilter.lock);
	return ret;
}

static int bpfilter_check_reply(const struct bpfilter_reply *rep)
{
	if (rep->magic != BPFILTER_MAGIC || rep->version != BPFILTER_PROTO_VERSION)
		return -EPROTO;
	if (rep->status > 0 || rep->status < -MAX_ERRNO || rep->len > BPFILTER_MAX_PAYLOAD)
		return -EPROTO;
	return 0;
}

/* bpfilter.lock held. */
static struct bpfilter_call *bpfilter_sent_call(u32 id)
{
	struct bpfilter_call *call;

	list_for_each_entry(call, &bpfilter.sent, node)
		if (call->req.id == id)
			return call;
	return NULL;
}

/*
 * A reply: its header, whose id names a call the helper has read, then its
 * payload, in as many writes as the helper likes; replies one after the other.
 */
static ssize_t bpfilter_write(struct file *file, const char __user *buf, size_t count,
			      loff_t *ppos)
{
	const size_t hdr = sizeof(struct bpfilter_reply);
	struct bpfilter_call *call;
	size_t pos, n = 0;
	ssize_t ret;

	mutex_lock(&bpfilter.lock);
	if (bpfilter.helper_file != file) {
		ret = -EPIPE;
		goto out;
	}
	pos = bpfilter.write_pos;
	if (pos < hdr) {
		n = min_t(size_t, count, hdr - pos);
		if (copy_from_user((u8 *)&bpfilter.rep + pos, buf, n)) {
			ret = -EFAULT;
			goto out;
		}
		pos += n;
		bpfilter.write_pos = pos;
		if (pos < hdr) {
			ret = n;
			goto out;
		}
		bpfilter.write_pos = 0;
		ret = bpfilter_check_reply(&bpfilter.rep);
		if (ret) {
			pr_err("the helper wrote a malformed reply\n");
			bpfilter_kill(-EIO);
			goto out;
		}
		call = bpfilter_sent_call(bpfilter.rep.id);
		if (!call) {
			pr_err("the helper wrote a reply to no request (id %u)\n", bpfilter.rep.id);
			bpfilter_kill(-EIO);
			ret = -EPROTO;
			goto out;
		}
		call->rep = bpfilter.rep;
		if (call->rep.len) {
			call->reply = kvmalloc(call->rep.len, GFP_KERNEL);
			if (!call->reply) {
				bpfilter_kill(-ENOMEM);
				ret = -ENOMEM;
				goto out;
			}
		}
		bpfilter.writing = call;
		bpfilter.write_pos = pos;
	}
	call = bpfilter.writing;
	if (count > n) {
		if (count - n > hdr + call->rep.len - pos) {
			pr_err("the helper wrote more than its reply\n");
			bpfilter_kill(-EIO);
			ret = -EPROTO;
			goto out;
		}
		if (copy_from_user(call->reply + pos - hdr, buf + n, count - n)) {
			ret = -EFAULT;
			goto out;
		}
		pos += count - n;
	}
	bpfilter.write_pos = pos;
	if (pos == hdr + call->rep.len)
		bpfilter_finish(call, 0);
	ret = count;
out:
	mutex_unlock(&bpfilter.lock);
	return ret;
}

static const u8 bpfilter_ct_families[] = { NFPROTO_IPV4, NFPROTO_IPV6 };

/* Conntrack references taken for the helper's tables, per namespace and family. */
struct bpfilter_net {
	unsigned int ct_users[ARRAY_SIZE(bpfilter_ct_families)];
};

static unsigned int bpfilter_net_id __read_mostly;
static DEFINE_MUTEX(bpfilter_ct_lock);

static long bpfilter_ioctl(struct file *file, unsigned int cmd, unsigned long arg)
{
	struct bpfilter_conntrack ct;
	struct bpfilter_net *bn;
	unsigned int *users;
	struct net *net;
	long err = 0;
	int i;

	if (cmd != BPFILTER_IOC_CONNTRACK_GET && cmd != BPFILTER_IOC_CONNTRACK_PUT &&
	    cmd != BPFILTER_IOC_NAT_ATTACH && cmd != BPFILTER_IOC_NAT_DETACH &&
	    cmd != BPFILTER_IOC_NAT_QUERY && cmd != BPFILTER_IOC_XT_MATCH_CREATE &&
	    cmd != BPFILTER_IOC_XT_MATCH_DESTROY && cmd != BPFILTER_IOC_XT_MATCH_LIST)
		return -ENOTTY;
	if (READ_ONCE(bpfilter.helper_file) != file)
		return -EPERM;
	if (cmd == BPFILTER_IOC_XT_MATCH_CREATE || cmd == BPFILTER_IOC_XT_MATCH_DESTROY ||
	    cmd == BPFILTER_IOC_XT_MATCH_LIST)
		return bpfilter_xt_ioctl(cmd, arg);
	if (cmd != BPFILTER_IOC_CONNTRACK_GET && cmd != BPFILTER_IOC_CONNTRACK_PUT)
		return bpfilter_nat_ioctl(cmd, arg);
	if (copy_from_user(&ct, (const void __user *)arg, sizeof(ct)))
		return -EFAULT;
	for (i = 0; i < ARRAY_SIZE(bpfilter_ct_families); i++)
		if (ct.family == bpfilter_ct_families[i])
			break;
	if (i == ARRAY_SIZE(bpfilter_ct_families))
		return -EINVAL;
	net = get_net_ns_by_fd(ct.netns_fd);
	if (IS_ERR(net))
		return PTR_ERR(net);
	bn = net_generic(net, bpfilter_net_id);
	users = &bn->ct_users[i];
	mutex_lock(&bpfilter_ct_lock);
	if (cmd == BPFILTER_IOC_CONNTRACK_GET) {
		err = nf_ct_netns_get(net, ct.family);
		if (!err)
			(*users)++;
	} else if (*users) {
		nf_ct_netns_put(net, ct.family);
		(*users)--;
	} else {
		err = -ENOENT;	/* nothing to give back: the helper's count is wrong */
	}
	mutex_unlock(&bpfilter_ct_lock);
	put_net(net);
	return err;
}

/*
 * A namespace going away, or the module (after its helper detached every table):
 * what was taken for it is given back, as ip_tables' and ip6_tables' rules give
 * theirs back.
 */
static void __net_exit bpfilter_ct_net_exit(struct net *net)
{
	struct bpfilter_net *bn = net_generic(net, bpfilter_net_id);
	int i;

	mutex_lock(&bpfilter_ct_lock);
	for (i = 0; i < ARRAY_SIZE(bpfilter_ct_families); i++)
		for (; bn->ct_users[i]; bn->ct_users[i]--)
			nf_ct_netns_put(net, bpfilter_ct_families[i]);
	mutex_unlock(&bpfilter_ct_lock);
}

static struct pernet_operations bpfilter_ct_net_ops = {
	.exit = bpfilter_ct_net_exit,
	.id = &bpfilter_net_id,
	.size = sizeof(struct bpfilter_net),
};

/*
 * Kfuncs for the helper's netfilter programs: what iptables' extensions do that a
 * BPF program cannot. For REJECT the program tests the rule, then calls the kfunc,
 * then returns the target's verdict itself; for addrtype it asks the kfunc for the
 * address types its rules test.
 *
 * A netfilter program runs either at a hook, whose state has the packet's
 * namespace, or under BPF_PROG_TEST_RUN, whose made-up state
 * (bpf_prog_test_run_nf()) has no namespace and no socket, at most the loopback
 * device, any hook number, and an skb without a route whose network header may
 * not even be set. The verifier cannot tell them apart, so every kfunc checks for
 * a namespace first and answers "nothing" without one: there is nothing to send
 * an answer into or to look an address up in, and the kernel's functions would
 * dereference it.
 */

/* ipt_REJECT's reject_tg(). */
static int bpfilter_reject4(struct sk_buff *skb, const struct nf_hook_state *state, u32 with)
{
	static const u8 icmp_code[] = {
		[IPT_ICMP_NET_UNREACHABLE] = ICMP_NET_UNREACH,
		[IPT_ICMP_HOST_UNREACHABLE] = ICMP_HOST_UNREACH,
		[IPT_ICMP_PROT_UNREACHABLE] = ICMP_PROT_UNREACH,
		[IPT_ICMP_PORT_UNREACHABLE] = ICMP_PORT_UNREACH,
		[IPT_ICMP_NET_PROHIBITED] = ICMP_NET_ANO,
		[IPT_ICMP_HOST_PROHIBITED] = ICMP_HOST_ANO,
		[IPT_ICMP_ADMIN_PROHIBITED] = ICMP_PKT_FILTERED,
	};

	/*
	 * Without a route both functions look one up in skb->dev's namespace: a
	 * packet with neither would have them dereference NULL. None reaches the
	 * hooks REJECT runs at, where packets are routed.
	 */
	if (!skb_valid_dst(skb) && !skb->dev)
		return -EINVAL;
	if (with == IPT_TCP_RESET) {
		nf_send_reset(state->net, state->sk, skb, state->hook);
		return 0;
	}
	/* echo-reply is refused by REJECT's checkentry: 0 here means no entry */
	if (with >= ARRAY_SIZE(icmp_code) || with == IPT_ICMP_ECHOREPLY)
		return -EINVAL;
	nf_send_unreach(skb, icmp_code[with], state->hook);
	return 0;
}

/* ip6t_REJECT's reject_tg6(). */
static int bpfilter_reject6(struct sk_buff *skb, const struct nf_hook_state *state, u32 with)
{
	u8 code;

	switch (with) {
	case IP6T_TCP_RESET:
		/* routes in state->net itself: neither route nor device needed */
		nf_send_reset6(state->net, state->sk, skb, state->hook);
		return 0;
	case IP6T_ICMP6_NO_ROUTE:
		code = ICMPV6_NOROUTE;
		break;
	case IP6T_ICMP6_ADM_PROHIBITED:
		code = ICMPV6_ADM_PROHIBITED;
		break;
	case IP6T_ICMP6_NOT_NEIGHBOUR:
		code = ICMPV6_NOT_NEIGHBOUR;
		break;
	case IP6T_ICMP6_ADDR_UNREACH:
		code = ICMPV6_ADDR_UNREACH;
		break;
	case IP6T_ICMP6_PORT_UNREACH:
		code = ICMPV6_PORT_UNREACH;
		break;
	case IP6T_ICMP6_POLICY_FAIL:
		code = ICMPV6_POLICY_FAIL;
		break;
	case IP6T_ICMP6_REJECT_ROUTE:
		code = ICMPV6_REJECT_ROUTE;
		break;
	default:
		/* echo-reply, for which reject_tg6() sends nothing, or no such value */
		return -EINVAL;
	}
	/*
	 * As in bpfilter_reject4(), except that nf_send_unreach6() gives a packet
	 * without a device the loopback device at LOCAL_OUT before it looks up a route.
	 */
	if (!skb_valid_dst(skb) && !skb->dev && state->hook != NF_INET_LOCAL_OUT)
		return -EINVAL;
	nf_send_unreach6(state->net, skb, code, state->hook);
	return 0;
}

/*
 * xt_addrtype's match_lookup_rt6(net, dev, addr, mask) for a mask holding
 * XT_ADDRTYPE_LOCAL, which is static there: the same calls, in the same order.
 *
 * Its mask only decides whether it asks nf_ipv6_chk_addr() about @dev, and that
 * answer only ever sets XT_ADDRTYPE_LOCAL; the rest does not read the mask (a
 * failed lookup answers XT_ADDRTYPE_UNREACHABLE alone, RTF_REJECT replaces the
 * answer with it, RTF_LOCAL without a device and anycast add their bits). So its
 * answers for two masks differ at most in the LOCAL bit, and only a mask that
 * holds LOCAL reads that bit: mask & this answer is mask & match_lookup_rt6(...,
 * mask) for every mask.
 */
static u32 bpfilter_lookup_rt6(struct net *net, const struct net_device *dev,
			       const struct in6_addr *addr)
{
	struct dst_entry *dst;
	struct flowi6 flow;
	u32 ret = 0;

	memset(&flow, 0, sizeof(flow));
	flow.daddr = *addr;
	if (dev)
		flow.flowi6_oif = dev->ifindex;

	if (dev && nf_ipv6_chk_addr(net, addr, dev, true))
		ret = XT_ADDRTYPE_LOCAL;

	if (nf_ip6_route(net, &dst, flowi6_to_flowi(&flow), false))
		return XT_ADDRTYPE_UNREACHABLE;

	if (dst_rt6_info(dst)->rt6i_flags & RTF_REJECT)
		ret = XT_ADDRTYPE_UNREACHABLE;

	if (!dev && dst_rt6_info(dst)->rt6i_flags & RTF_LOCAL)
		ret |= XT_ADDRTYPE_LOCAL;
	if (ipv6_anycast_destination(dst, addr))
		ret |= XT_ADDRTYPE_ANYCAST;

	dst_release(dst);
	return ret;
}

/* addrtype_mt_v1()'s choice of device. */
static const struct net_device *bpfilter_addr_type_dev(const struct nf_hook_state *state,
							u32 flags)
{
	if (flags & XT_ADDRTYPE_LIMIT_IFACE_IN)
		return state->in;
	if (flags & XT_ADDRTYPE_LIMIT_IFACE_OUT)
		return state->out;
	return NULL;
}

/*
 * What bpfilter_addr_type() answers without a namespace: a type no 16-bit mask
 * has a bit for (RTN_UNSPEC would match --src-type UNSPEC), in a byte.
 */
#define BPFILTER_ADDR_TYPE_NONE 16

__bpf_kfunc_start_defs();

/**
 * bpfilter_reject - send what ipt_REJECT's reject_tg() or ip6t_REJECT's reject_tg6() sends
 * @skb: the packet, from the program's context
 * @state: its hook state, from the program's context
 * @with: the rule's reject type: enum ipt_reject_with if @state->pf is NFPROTO_IPV4,
 *        enum ip6t_reject_with if it is NFPROTO_IPV6
 *
 * The kernel's own nf_send_reset() and nf_send_unreach() (IPv4), nf_send_reset6()
 * and nf_send_unreach6() (IPv6), with the arguments the targets pass them, so the
 * answer is the kernel's to the byte. The caller returns NF_DROP, as both targets
 * do. Only where the targets may run: the filter table's hooks LOCAL_IN, FORWARD
 * and LOCAL_OUT (any netfilter program may call this).
 *
 * Return: 0 once the kernel's function has been called (which, as for the
 * targets, may still send nothing: no reset for a reset, a bad checksum, ...), or
 * -EINVAL, nothing sent: another family or hook; @with out of range, or
 * echo-reply (which REJECT's checkentry refuses for both families); no namespace
 * (BPF_PROG_TEST_RUN); a packet without a route whose route the function would
 * look up through skb->dev, and no device.
 */
__bpf_kfunc int bpfilter_reject(struct sk_buff *skb, const struct nf_hook_state *state, u32 with)
{
	if (!state->net)
		return -EINVAL;
	switch (state->hook) {
	case NF_INET_LOCAL_IN:
	case NF_INET_FORWARD:
	case NF_INET_LOCAL_OUT:
		break;
	default:
		return -EINVAL;
	}
	switch (state->pf) {
	case NFPROTO_IPV4:
		return bpfilter_reject4(skb, state, with);
	case NFPROTO_IPV6:
		return bpfilter_reject6(skb, state, with);
	default:
		return -EINVAL;
	}
}

/**
 * bpfilter_addr_type - the address type xt_addrtype's match_type() tests
 * @state: the hook state, from the program's context
 * @addr: an IPv4 address, as on the wire
 * @flags: the rule's xt_addrtype_info_v1 flags (0 for revision 0)
 *
 * A netfilter program cannot look up routes. This is the lookup addrtype_mt_v1()
 * makes, on the device it picks: the input device with --limit-iface-in, else the
 * output device with --limit-iface-out, else none. The program tests
 * (1 << type) & mask itself.
 *
 * Return: inet_dev_addr_type() for @addr in the hook's namespace (RTN_*), as
 * match_type() has it: the device decides the type, not only the table. Without a
 * namespace (BPF_PROG_TEST_RUN) 16, which no mask matches.
 */
__bpf_kfunc u32 bpfilter_addr_type(const struct nf_hook_state *state, __be32 addr, u32 flags)
{
	if (!state->net)
		return BPFILTER_ADDR_TYPE_NONE;
	return inet_dev_addr_type(state->net, bpfilter_addr_type_dev(state, flags), addr);
}

/**
 * bpfilter_addr_type6 - what xt_addrtype's match_type6() needs of an IPv6 address
 * @state: the hook state, from the program's context
 * @addr_hi: bytes 0 to 7 of the address as on the wire, read as a little-endian
 *           u64 (what BPF_LDX_MEM(BPF_DW) loads on a little-endian machine):
 *           byte 0 is bits 0-7, byte 7 bits 56-63
 * @addr_lo: bytes 8 to 15, the same way (::1 is addr_hi 0, addr_lo 1 << 56)
 * @flags: the rule's xt_addrtype_info_v1 flags
 *
 * match_type6(net, dev, addr, mask) tests the kind of the address
 * (ipv6_addr_type()) and, if the mask has LOCAL, ANYCAST or UNREACHABLE, makes
 * match_lookup_rt6()'s route lookup, which a netfilter program cannot. This does
 * both, for every mask at once, on the device addrtype_mt_v1() picks (the input
 * device with XT_ADDRTYPE_LIMIT_IFACE_IN, else the output device with
 * XT_ADDRTYPE_LIMIT_IFACE_OUT, else none), in the hook's namespace. Its answer v
 * holds these XT_ADDRTYPE_* bits:
 *
 * - UNSPEC if ipv6_addr_type() is IPV6_ADDR_ANY; UNICAST if it has
 *   IPV6_ADDR_UNICAST; MULTICAST if it has IPV6_ADDR_MULTICAST;
 * - LOCAL, ANYCAST, UNREACHABLE: match_lookup_rt6(net, dev, addr, mask) for a mask
 *   with XT_ADDRTYPE_LOCAL, whose bits any mask reads as its own lookup's
 *   (see bpfilter_lookup_rt6()).
 *
 * With K = UNSPEC | UNICAST | MULTICAST and R = LOCAL | ANYCAST | UNREACHABLE, the
 * program then has, for any mask:
 *
 *   match_type6(mask) == !(mask & K & ~v) && (!(mask & R) || (mask & R & v))
 *
 * Return: v; without a namespace (BPF_PROG_TEST_RUN) 0, for which every mask with
 * a bit of K or R fails.
 */
__bpf_kfunc u32 bpfilter_addr_type6(const struct nf_hook_state *state, u64 addr_hi, u64 addr_lo,
				    u32 flags)
{
	struct in6_addr addr;
	u32 ret = 0;
	int type;

	if (!state->net)
		return 0;
	put_unaligned_le64(addr_hi, &addr.s6_addr[0]);
	put_unaligned_le64(addr_lo, &addr.s6_addr[8]);

	type = ipv6_addr_type(&addr);
	if (type == IPV6_ADDR_ANY)
		ret |= XT_ADDRTYPE_UNSPEC;
	if (type & IPV6_ADDR_UNICAST)
		ret |= XT_ADDRTYPE_UNICAST;
	if (type & IPV6_ADDR_MULTICAST)
		ret |= XT_ADDRTYPE_MULTICAST;
	return ret | bpfilter_lookup_rt6(state->net, bpfilter_addr_type_dev(state, flags), &addr);
}

__bpf_kfunc_end_defs();

#ifndef KF_TRUSTED_ARGS
/* kernels that dropped the flag check every kfunc's pointer arguments so */
#define KF_TRUSTED_ARGS 0
#endif

BTF_KFUNCS_START(bpfilter_kfunc_ids)
BTF_ID_FLAGS(func, bpfilter_reject, KF_TRUSTED_ARGS)
BTF_ID_FLAGS(func, bpfilter_addr_type, KF_TRUSTED_ARGS)
BTF_ID_FLAGS(func, bpfilter_addr_type6, KF_TRUSTED_ARGS)
BTF_ID_FLAGS(func, bpfilter_nat, KF_TRUSTED_ARGS)		/* nat.c */
BTF_ID_FLAGS(func, bpfilter_set_mark, KF_TRUSTED_ARGS)		/* mark.c */
BTF_ID_FLAGS(func, bpfilter_connmark, KF_TRUSTED_ARGS)		/* mark.c */
BTF_ID_FLAGS(func, bpfilter_xt_match, KF_TRUSTED_ARGS)		/* xtmatch.c */
BTF_ID_FLAGS(func, bpfilter_xt_target, KF_TRUSTED_ARGS)		/* xtmatch.c */
BTF_ID_FLAGS(func, bpfilter_route_snapshot, KF_TRUSTED_ARGS)	/* mangle.c */
BTF_ID_FLAGS(func, bpfilter_reroute, KF_TRUSTED_ARGS)		/* mangle.c */
BTF_ID_FLAGS(func, bpfilter_trace, KF_TRUSTED_ARGS)		/* trace.c */
BTF_KFUNCS_END(bpfilter_kfunc_ids)

static const struct btf_kfunc_id_set bpfilter_kfunc_set = {
	.owner = THIS_MODULE,
	.set = &bpfilter_kfunc_ids,
};

/*
 * Readable when a request waits: the helper sleeps in poll() between requests so
 * that it can also wake on a timer, to drop the tables of deleted namespaces.
 */
static __poll_t bpfilter_poll(struct file *file, poll_table *wait)
{
	poll_wait(file, &bpfilter.helper_wq, wait);
	if (READ_ONCE(bpfilter.helper_file) != file)
		return EPOLLERR;
	return !list_empty_careful(&bpfilter.queue) ? EPOLLIN | EPOLLRDNORM : 0;
}

/*
 * The helper holds the device open for as long as the module is loaded: a
 * reference to the module from its open file would make the module impossible to
 * unload, and the helper is only told to exit by module exit. So the file holds
 * none while open; module exit refuses new opens (bpfilter.closed) and waits for
 * every open file to be released (open_files). What may still run the module's
 * code after that is covered by a reference: bpfilter_release() takes one, which
 * __fput() puts back through .owner once the release has returned, and module exit
 * waits for it too. bpfilter_open() installs these operations on success only:
 * the ones the misc device opens with have no owner, so that a helper spawned
 * while the module is unloading (to detach the tables) can still open it, which
 * fops_get() would refuse.
 */
static const struct file_operations bpfilter_fops = {
	.owner		= THIS_MODULE,
	.release	= bpfilter_release,
	.read		= bpfilter_read,
	.poll		= bpfilter_poll,
	.write		= bpfilter_write,
	.unlocked_ioctl	= bpfilter_ioctl,
};

static const struct file_operations bpfilter_open_fops = {
	.open		= bpfilter_open,
};

static struct miscdevice bpfilter_dev = {
	.minor	= MISC_DYNAMIC_MINOR,
	.name	= "bpfilter",
	.fops	= &bpfilter_open_fops,
	.mode	= 0600,
};

static int bpfilter_names_show(struct seq_file *seq, u32 family)
{
	struct bpfilter_call *call;
	int err;

	call = bpfilter_call_new(BPFILTER_OP_TABLE_NAMES, family, 0, seq_file_single_net(seq), 0, 0);
	if (!call)
		return -ENOMEM;
	err = bpfilter_transact(call);
	/* A family the helper does not support has no tables to list. */
	if (!err && call->rep.status != -EAFNOSUPPORT)
		err = bpfilter_status(call);
	if (!err && !call->rep.status)
		seq_write(seq, call->reply, call->rep.len);
	bpfilter_call_put(call);
	return err;
}

static int bpfilter_ipv4_names_show(struct seq_file *seq, void *v)
{
	return bpfilter_names_show(seq, NFPROTO_IPV4);
}

static int bpfilter_ipv6_names_show(struct seq_file *seq, void *v)
{
	return bpfilter_names_show(seq, NFPROTO_IPV6);
}

/*
 * iptables-legacy looks for these to tell whether the kernel speaks iptables
 * (else it runs `modprobe ip_tables`), and iptables-save lists tables from them.
 */
static int __net_init bpfilter_net_init(struct net *net)
{
	kuid_t root_uid = make_kuid(net->user_ns, 0);
	kgid_t root_gid = make_kgid(net->user_ns, 0);
	struct proc_dir_entry *v4, *v6;

	v4 = proc_create_net_single("ip_tables_names", 0440, net->proc_net,
				    bpfilter_ipv4_names_show, NULL);
	if (!v4)
		return -ENOMEM;
	v6 = proc_create_net_single("ip6_tables_names", 0440, net->proc_net,
				    bpfilter_ipv6_names_show, NULL);
	if (!v6) {
		remove_proc_entry("ip_tables_names", net->proc_net);
		return -ENOMEM;
	}
	if (uid_valid(root_uid) && gid_valid(root_gid)) {
		proc_set_user(v4, root_uid, root_gid);
		proc_set_user(v6, root_uid, root_gid);
	}
	return 0;
}

static void __net_exit bpfilter_net_exit(struct net *net)
{
	remove_proc_entry("ip6_tables_names", net->proc_net);
	remove_proc_entry("ip_tables_names", net->proc_net);
}

static struct pernet_operations bpfilter_net_ops = {
	.init = bpfilter_net_init,
	.exit = bpfilter_net_exit,
};

/*
 * ip_tables would find its socket options taken only after creating
 * /proc/net/ip_tables_names over ours (a kernel warning): it is refused
 * before it starts.
 */
static int bpfilter_module_notify(struct notifier_block *nb, unsigned long action, void *data)
{
	struct module *mod = data;

	if (action != MODULE_STATE_COMING ||
	    (strcmp(mod->name, "ip_tables") && strcmp(mod->name, "ip6_tables")))
		return NOTIFY_DONE;
	pr_err("refusing to load %s: bpfilter handles iptables; rmmod bpfilter first\n", mod->name);
	return notifier_from_errno(-EBUSY);
}

static struct notifier_block bpfilter_module_nb = {
	.notifier_call = bpfilter_module_notify,
};

/* Asks the helper to detach every table and exit, and waits until it has let go of the device. */
static void bpfilter_shutdown(void)
{
	struct bpfilter_call *call;
	int err = -ENOMEM;

	mutex_lock(&bpfilter.lock);
	bpfilter.exiting = true;
	mutex_unlock(&bpfilter.lock);
	call = bpfilter_call_new(BPFILTER_OP_SHUTDOWN, NFPROTO_UNSPEC, 0, NULL, 0, 0);
	if (call) {
		err = bpfilter_transact(call);
		if (!err)
			err = bpfilter_status(call);
		bpfilter_call_put(call);
	}
	if (err)
		pr_err("the helper did not shut down (error %d): what it attached stays pinned under /run/bpfilter/bpffs\n",
		       err);
	/* From here open_files only goes down. */
	mutex_lock(&bpfilter.lock);
	bpfilter.closed = true;
	mutex_unlock(&bpfilter.lock);
	if (!wait_event_timeout(bpfilter.caller_wq, !READ_ONCE(bpfilter.open_files),
				bpfilter_timeout())) {
		pr_err("the helper did not exit within %u s: killing it\n", timeout);
		mutex_lock(&bpfilter.lock);
		bpfilter_kill(-ETIMEDOUT);
		mutex_unlock(&bpfilter.lock);
	}
	/* The device's operations are this module's code. */
	mutex_lock(&bpfilter.lock);
	while (bpfilter.open_files) {
		mutex_unlock(&bpfilter.lock);
		wait_event(bpfilter.caller_wq, !READ_ONCE(bpfilter.open_files));
		mutex_lock(&bpfilter.lock);
	}
	bpfilter_forget_helper();
	mutex_unlock(&bpfilter.lock);
	/*
	 * And the end of the last release: its reference is put back after it has
	 * returned (bpfilter_fops). While unloading nothing else can take one
	 * (try_module_get() fails), so what is left is -1, "unloading".
	 */
	while (module_refcount(THIS_MODULE) >= 0)
		schedule_timeout_uninterruptible(1);
}

static int __init bpfilter_init(void)
{
	int err;

	if (umh_path[0] != '/' || !*kbasename(umh_path)) {
		pr_err("umh_path must be an absolute file name, not \"%s\"\n", umh_path);
		return -EINVAL;
	}
	/*
	 * No unregistering: the set goes with the module's BTF. A program calling a
	 * kfunc holds the module, so bpfilter.ko stays loaded while a table with
	 * REJECT or addrtype exists, as ipt_REJECT does while a rule uses it.
	 */
	err = register_btf_kfunc_id_set(BPF_PROG_TYPE_NETFILTER, &bpfilter_kfunc_set);
	if (err) {
		pr_err("cannot register the kfuncs of REJECT, addrtype, the nat targets, MARK, CONNMARK and the kernel's matches (error %d)\n", err);
		return err;
	}
	err = bpfilter_nat_init();
	if (err) {
		pr_err("cannot set up the nat table's lookups and kfuncs (error %d)\n", err);
		return err;
	}
	err = bpfilter_xt_init();
	if (err)
		goto err_nat;
	err = register_module_notifier(&bpfilter_module_nb);
	if (err)
		goto err_xt;
	err = nf_register_sockopt(&bpfilter_ipv4_sockopts);
	if (err) {
		pr_err("cannot take iptables' socket options (error %d)%s\n", err,
		       err == -EBUSY ? ": ip_tables is loaded; unload it (and iptable_*) first" : "");
		goto err_notifier;
	}
	err = nf_register_sockopt(&bpfilter_ipv6_sockopts);
	if (err) {
		pr_err("cannot take ip6tables' socket options (error %d)%s\n", err,
		       err == -EBUSY ? ": ip6_tables is loaded; unload it (and ip6table_*) first" : "");
		goto err_ipv4;
	}
	err = misc_register(&bpfilter_dev);
	if (err)
		goto err_ipv6;
	err = register_pernet_subsys(&bpfilter_ct_net_ops);
	if (err)
		goto err_dev;
	err = register_pernet_subsys(&bpfilter_net_ops);
	if (err)
		goto err_ct;
	mutex_lock(&bpfilter.spawn_lock);
	err = bpfilter_spawn();
	mutex_unlock(&bpfilter.spawn_lock);
	if (err)
		goto err_pernet;
	WRITE_ONCE(bpfilter.ready, true);
	return 0;

err_pernet:
	unregister_pernet_subsys(&bpfilter_net_ops);
err_ct:
	unregister_pernet_subsys(&bpfilter_ct_net_ops);
err_dev:
	misc_deregister(&bpfilter_dev);
err_ipv6:
	nf_unregister_sockopt(&bpfilter_ipv6_sockopts);
err_ipv4:
	nf_unregister_sockopt(&bpfilter_ipv4_sockopts);
err_notifier:
	unregister_module_notifier(&bpfilter_module_nb);
err_xt:
	bpfilter_xt_exit();
err_nat:
	bpfilter_nat_exit();
	return err;
}

static void __exit bpfilter_exit(void)
{
	int err;

	unregister_pernet_subsys(&bpfilter_net_ops);
	nf_unregister_sockopt(&bpfilter_ipv6_sockopts);
	nf_unregister_sockopt(&bpfilter_ipv4_sockopts);
	bpfilter_shutdown();
	misc_deregister(&bpfilter_dev);
	/* After the shutdown: the tables reading conntrack and running matches are gone by now. */
	bpfilter_xt_exit();
	bpfilter_nat_exit();
	unregister_pernet_subsys(&bpfilter_ct_net_ops);
	err = bpfilter_umh_file(true);
	if (err && err != -ENOENT)
		pr_warn("cannot remove %s: error %d\n", umh_path, err);
	unregister_module_notifier(&bpfilter_module_nb);
}

module_init(bpfilter_init);
module_exit(bpfilter_exit);
MODULE_DESCRIPTION("iptables backed by BPF programs at the netfilter hooks");
MODULE_LICENSE("GPL");
