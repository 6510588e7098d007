//! The unprivileged account commands run as, read from the guest's /etc/passwd.

use std::path::PathBuf;

/// The account user commands and created files belong to.
#[derive(Debug, Clone)]
pub struct SandboxUser {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: PathBuf,
    /// Where commands start and relative paths begin: the image's `WorkingDir`, else home.
    pub workdir: PathBuf,
}

pub const USER_NAME: &str = "user";

impl SandboxUser {
    /// The account of a template made from an image is the image's `User` (root when it names
    /// none, as in a container); the system template's is `user`. Falls back to root.
    pub fn load(image: Option<&cove_proto::image::ImageConfig>) -> Self {
        let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
        let group = std::fs::read_to_string("/etc/group").unwrap_or_default();
        let root = || SandboxUser::new("root".into(), 0, 0, PathBuf::from("/root"));
        let mut user = match image {
            None => lookup_passwd(&passwd, USER_NAME).unwrap_or_else(root),
            Some(c) if c.user.is_empty() => lookup_passwd(&passwd, "root").unwrap_or_else(root),
            Some(c) => from_spec(&passwd, &group, &c.user),
        };
        if let Some(dir) = image.map(|c| c.working_dir.as_str()).filter(|d| d.starts_with('/')) {
            user.workdir = PathBuf::from(dir);
        }
        // An image's user often has no home directory (root of a minimal image has no /root).
        if !user.workdir.is_dir() {
            user.workdir = PathBuf::from("/");
        }
        user
    }

    fn new(name: String, uid: u32, gid: u32, home: PathBuf) -> Self {
        SandboxUser { name, uid, gid, workdir: home.clone(), home }
    }

    /// Resolves a request path: absolute paths stay, relative ones are taken from the workdir.
    pub fn resolve(&self, path: &str) -> PathBuf {
        if path.starts_with('/') {
            PathBuf::from(path)
        } else {
            self.workdir.join(path)
        }
    }
}

/// A container `User`: `name`, `uid`, `name:group` or `uid:gid`. A uid with no account gets
/// group 0 and home `/`, as container runtimes do.
pub fn from_spec(passwd: &str, group: &str, spec: &str) -> SandboxUser {
    let (who, grp) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let by_uid = |uid: u32| {
        passwd.lines().find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f.len() >= 7 && f[2].parse() == Ok(uid)).then(|| lookup_passwd(passwd, f[0])).flatten()
        })
    };
    let mut user = match who.parse::<u32>() {
        Ok(uid) => {
            by_uid(uid).unwrap_or_else(|| SandboxUser::new(uid.to_string(), uid, 0, PathBuf::from("/")))
        }
        Err(_) => {
            lookup_passwd(passwd, who).unwrap_or_else(|| SandboxUser::new(who.to_string(), 0, 0, "/".into()))
        }
    };
    if let Some(g) = grp {
        let gid = g.parse::<u32>().ok().or_else(|| {
            group.lines().find_map(|l| {
                let f: Vec<&str> = l.split(':').collect();
                (f.len() >= 3 && f[0] == g).then(|| f[2].parse().ok()).flatten()
            })
        });
        if let Some(gid) = gid {
            user.gid = gid;
        }
    }
    user
}

/// Finds `name` in passwd(5) text.
pub fn lookup_passwd(passwd: &str, name: &str) -> Option<SandboxUser> {
    passwd.lines().find_map(|line| {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() < 7 || f[0] != name {
            return None;
        }
        Some(SandboxUser::new(name.to_string(), f[2].parse().ok()?, f[3].parse().ok()?, PathBuf::from(f[5])))
    })
}

/// Maps uids and gids to names from /etc/passwd and /etc/group, for `FileInfo`.
#[derive(Debug, Default, Clone)]
pub struct Names {
    users: Vec<(u32, String)>,
    groups: Vec<(u32, String)>,
}

impl Names {
    pub fn load() -> Self {
        let parse = |path: &str| -> Vec<(u32, String)> {
            std::fs::read_to_string(path)
                .unwrap_or_default()
                .lines()
                .filter_map(|l| {
                    let f: Vec<&str> = l.split(':').collect();
                    Some((f.get(2)?.parse().ok()?, f.first()?.to_string()))
                })
                .collect()
        };
        Names { users: parse("/etc/passwd"), groups: parse("/etc/group") }
    }

    pub fn user(&self, uid: u32) -> String {
        find(&self.users, uid)
    }

    pub fn group(&self, gid: u32) -> String {
        find(&self.groups, gid)
    }

    pub fn uid_of(&self, name: &str) -> Option<u32> {
        self.users.iter().find(|(_, n)| n == name).map(|(id, _)| *id).or_else(|| name.parse().ok())
    }

    pub fn gid_of(&self, name: &str) -> Option<u32> {
        self.groups.iter().find(|(_, n)| n == name).map(|(id, _)| *id).or_else(|| name.parse().ok())
    }
}

fn find(table: &[(u32, String)], id: u32) -> String {
    table.iter().find(|(i, _)| *i == id).map(|(_, n)| n.clone()).unwrap_or_else(|| id.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwd_lookup() {
        let p = "root:x:0:0:root:/root:/bin/bash\nuser:x:1000:1000::/home/user:/bin/bash\n";
        let u = lookup_passwd(p, "user").unwrap();
        assert_eq!((u.uid, u.gid), (1000, 1000));
        assert_eq!(u.resolve("a/b"), PathBuf::from("/home/user/a/b"));
        assert_eq!(u.resolve("/etc"), PathBuf::from("/etc"));
        assert!(lookup_passwd(p, "nobody").is_none());
    }

    #[test]
    fn container_user_specs() {
        let p = "root:x:0:0:root:/root:/bin/sh\napp:x:1001:1002::/srv/app:/bin/sh\n";
        let g = "root:x:0:\nstaff:x:50:\n";
        let ids = |spec: &str| {
            let u = from_spec(p, g, spec);
            (u.uid, u.gid, u.home.display().to_string())
        };
        assert_eq!(ids("app"), (1001, 1002, "/srv/app".into()));
        assert_eq!(ids("1001"), (1001, 1002, "/srv/app".into()));
        assert_eq!(ids("app:staff"), (1001, 50, "/srv/app".into()));
        assert_eq!(ids("4242"), (4242, 0, "/".into()));
        assert_eq!(ids("4242:7"), (4242, 7, "/".into()));
        assert_eq!(from_spec(p, g, "4242").name, "4242");
    }
}
