use super::*;
use crate::{BootError, Device, Entry, FileRef};
use std::collections::HashMap;

fn entry(cfg: &str, grubenv: &[(&str, &str)]) -> Result<Option<Entry>, BootError> {
    let exists = |p: &str| p == "/boot/grub/grubenv" && !grubenv.is_empty();
    let grubenv = grubenv.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<HashMap<_, _>>();
    let env = Env { prefix: "/boot/grub".into(), grubenv, exists: &exists };
    default_entry(cfg, &parse::parse(cfg)?, &env)
}

const DEBIAN: &str = r#"
if [ -s $prefix/grubenv ]; then
  set have_grubenv=true
  load_env
fi
if [ "${next_entry}" ] ; then
   set default="${next_entry}"
   set next_entry=
else
   set default="${saved_entry}"
fi
if [ x"${feature_menuentry_id}" = xy ]; then
  menuentry_id_option="--id"
else
  menuentry_id_option=""
fi
function load_video {
  insmod all_video
}
menuentry 'Debian GNU/Linux' --class debian $menuentry_id_option 'gnulinux-simple-U' {
	load_video
	if [ x$grub_platform = xxen ]; then insmod xzio; insmod lzopio; fi
	search --no-floppy --fs-uuid --set=root 1234-abcd
	echo	'Loading Linux 6.1 ...'
	linux	/boot/vmlinuz-6.1 root=UUID=x ro  quiet $vt_handoff
	initrd	/boot/initrd.img-6.1
}
submenu 'Advanced options for Debian GNU/Linux' $menuentry_id_option 'gnulinux-advanced-U' {
	menuentry 'Debian GNU/Linux, with Linux 6.0' $menuentry_id_option 'gnulinux-6.0-advanced-U' {
		set root='hd0,gpt2'
		linux	/vmlinuz-6.0 root=UUID=x ro single
		initrd	/intel-ucode.img /initrd.img-6.0
	}
}
"#;

#[test]
fn debian_default_saved_and_next_entries() {
    let simple = entry(DEBIAN, &[]).unwrap().unwrap();
    assert_eq!(simple.title, "Debian GNU/Linux");
    assert_eq!(simple.kernel, FileRef { device: Device::Uuid("1234-abcd".into()), path: "/boot/vmlinuz-6.1".into() });
    assert_eq!(simple.args, "root=UUID=x ro quiet");
    assert_eq!(simple.initrds.len(), 1);
    let saved = [("saved_entry", "gnulinux-advanced-U>gnulinux-6.0-advanced-U")];
    let adv = entry(DEBIAN, &saved).unwrap().unwrap();
    assert_eq!(adv.title, "Debian GNU/Linux, with Linux 6.0");
    assert_eq!(adv.kernel.device, Device::Part(2));
    assert_eq!(
        adv.initrds.iter().map(|f| f.path.as_str()).collect::<Vec<_>>(),
        ["/intel-ucode.img", "/initrd.img-6.0"]
    );
    let next = entry(DEBIAN, &[("saved_entry", "gnulinux-simple-U"), ("next_entry", "1>0")]).unwrap().unwrap();
    assert_eq!(next.title, adv.title, "next_entry wins over saved_entry");
    let by_title = entry(DEBIAN, &[("saved_entry", "Debian GNU/Linux")]).unwrap().unwrap();
    assert_eq!(by_title.title, "Debian GNU/Linux");
    let unknown = entry(DEBIAN, &[("saved_entry", "gone")]).unwrap().unwrap();
    assert_eq!(unknown.title, "Debian GNU/Linux", "an unknown default boots the first entry, as GRUB");
}

#[test]
fn what_is_not_understood_is_refused_quoting_its_line() {
    let e = entry("menuentry a {\n  chainloader +1\n  linux /k\n}\n", &[]).unwrap_err();
    assert_eq!(e.to_string(), "the entry 'a' needs 'chainloader +1', which smpft's boot loader does not understand");
    let e = entry("configfile /other.cfg\n", &[]).unwrap_err();
    assert!(e.to_string().contains("'configfile /other.cfg'"), "{e}");
    let e = entry("menuentry a {\n  echo hi\n}\n", &[]).unwrap_err();
    assert!(e.to_string().contains("has no linux command"), "{e}");
    let e = entry("for i in 1 2; do echo; done\n", &[]).unwrap_err();
    assert!(e.to_string().contains("'for' is not understood"), "{e}");
    assert!(entry("menuentry 'unclosed {\n", &[]).is_err());
    assert!(entry("menuentry a {\n linux /k\n", &[]).is_err());
    assert!(entry("if true; then\n", &[]).is_err());
    assert!(entry("", &[]).unwrap_err().to_string().contains("no menuentry"));
    let submenu = entry("set default=0\nsubmenu s {\n menuentry a { linux /k }\n}\n", &[]).unwrap_err();
    assert!(submenu.to_string().contains("submenu 's'"), "{submenu}");
}

#[test]
fn blscfg_hands_over_to_bls_entries() {
    assert_eq!(entry("load_env\nblscfg\n", &[]).unwrap(), None);
}

#[test]
fn nesting_and_expansion_are_bounded() {
    let deep = format!("{}{}", "if true; then\n".repeat(100), "fi\n".repeat(100));
    assert!(entry(&deep, &[]).unwrap_err().to_string().contains("nest deeper than 32"));
    let mut doubling = String::from("set a=xxxxxxxx\n");
    for _ in 0..40 {
        doubling.push_str("set a=$a$a\n");
    }
    doubling.push_str("menuentry t { linux /k $a }\n");
    let e = entry(&doubling, &[]).unwrap().unwrap();
    assert!(e.args.len() <= 4096);
}

#[test]
fn quoting_and_variables() {
    let cfg = "set k=\"/vm linuz\"\nmenuentry \"a \\\"q\\\"\" {\n linux \"$k\" 'x $y' a\\ b ${k}\n}\n";
    let e = entry(cfg, &[]).unwrap().unwrap();
    assert_eq!(e.title, "a \"q\"");
    assert_eq!(e.kernel.path, "/vm linuz");
    assert_eq!(e.args, "x $y a b /vm linuz");
}
