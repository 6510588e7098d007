//! The unprivileged account commands run as, read from the guest's /etc/passwd.

use std::path::PathBuf;

/// The account user commands and created files belong to.
#[derive(Debug, Clone)]
pub struct SandboxUser {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: PathBuf,
}

pub const USER_NAME: &str = "user";

impl SandboxUser {
    /// Looks `user` up in /etc/passwd; falls back to root when the template has no such user.
    pub fn load() -> Self {
        let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
        lookup_passwd(&passwd, USER_NAME).unwrap_or_else(|| SandboxUser {
            name: "root".into(),
            uid: 0,
            gid: 0,
            home: PathBuf::from("/root"),
        })
    }

    /// Resolves a request path: absolute paths stay, relative ones are taken from the home dir.
    pub fn resolve(&self, path: &str) -> PathBuf {
        if path.starts_with('/') {
            PathBuf::from(path)
        } else {
            self.home.join(path)
        }
    }
}

/// Finds `name` in passwd(5) text.
pub fn lookup_passwd(passwd: &str, name: &str) -> Option<SandboxUser> {
    passwd.lines().find_map(|line| {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() < 7 || f[0] != name {
            return None;
        }
        Some(SandboxUser {
            name: name.to_string(),
            uid: f[2].parse().ok()?,
            gid: f[3].parse().ok()?,
            home: PathBuf::from(f[5]),
        })
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
}
